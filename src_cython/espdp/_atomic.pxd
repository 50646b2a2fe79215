# Atomics and locks for state that worker threads share (GCC/Clang builtins),
# and a reader-writer lock for the SA table (pthreads).
from libc.stdint cimport uint64_t

cdef extern from *:
    """
    /* State shared by worker threads: GCC/Clang atomics. */
    static inline uint64_t espdp_load64(const uint64_t *p)
    { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline void espdp_store64(uint64_t *p, uint64_t v)
    { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
    static inline void espdp_add64(uint64_t *p, uint64_t v)
    { __atomic_add_fetch(p, v, __ATOMIC_RELAXED); }
    static inline int espdp_cas64(uint64_t *p, uint64_t *expected, uint64_t desired)
    { return __atomic_compare_exchange_n(p, expected, desired, 0, __ATOMIC_RELAXED,
                                         __ATOMIC_RELAXED); }
    static inline int espdp_first(int *flag)
    { return !__atomic_exchange_n(flag, 1, __ATOMIC_RELAXED); }
    static inline void espdp_lock(int *l) {
        while (__atomic_exchange_n(l, 1, __ATOMIC_ACQUIRE))
            while (__atomic_load_n(l, __ATOMIC_RELAXED)) {
    #if defined(__x86_64__) || defined(__i386__)
                __builtin_ia32_pause();
    #endif
            }
    }
    static inline void espdp_unlock(int *l) { __atomic_store_n(l, 0, __ATOMIC_RELEASE); }
    """
    uint64_t espdp_load64(const uint64_t *p) nogil
    void espdp_store64(uint64_t *p, uint64_t v) nogil
    void espdp_add64(uint64_t *p, uint64_t v) nogil
    bint espdp_cas64(uint64_t *p, uint64_t *expected, uint64_t desired) nogil
    bint espdp_first(int *flag) nogil
    void espdp_lock(int *l) nogil
    void espdp_unlock(int *l) nogil


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_rwlock_t:
        pass
    ctypedef struct pthread_rwlockattr_t:
        pass
    int pthread_rwlock_init(pthread_rwlock_t *l, const pthread_rwlockattr_t *a)
    int pthread_rwlock_destroy(pthread_rwlock_t *l)
    int pthread_rwlock_rdlock(pthread_rwlock_t *l)
    int pthread_rwlock_wrlock(pthread_rwlock_t *l)
    int pthread_rwlock_unlock(pthread_rwlock_t *l)
    int pthread_rwlockattr_init(pthread_rwlockattr_t *a)
    int pthread_rwlockattr_destroy(pthread_rwlockattr_t *a)
    int pthread_rwlockattr_setkind_np(pthread_rwlockattr_t *a, int pref)
    int PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP
