"""Build the Cython engine against the system's OpenSSL libcrypto.

Compiler flags come from ``pkg-config libcrypto``; set ``ESPDP_OPENSSL_CFLAGS``
and ``ESPDP_OPENSSL_LIBS`` to override.  ``ESPDP_CYTHON_DEBUG=1`` builds with
annotation and line tracing; ``ESPDP_SANITIZE=1`` with ASan and UBSan.
"""

import os
import shlex
import subprocess
import sys

from setuptools import Extension, setup

MODULES = ["_replay", "_crypto", "_esp", "_engine", "_flow", "_mmsg", "_vnet"]


def openssl_flags():
    cflags = os.environ.get("ESPDP_OPENSSL_CFLAGS")
    libs = os.environ.get("ESPDP_OPENSSL_LIBS")
    if cflags is None or libs is None:
        try:
            cflags = cflags if cflags is not None else subprocess.check_output(
                ["pkg-config", "--cflags", "libcrypto"], text=True)
            libs = libs if libs is not None else subprocess.check_output(
                ["pkg-config", "--libs", "libcrypto"], text=True)
        except (OSError, subprocess.CalledProcessError):
            cflags, libs = "", "-lcrypto"
    return shlex.split(cflags), shlex.split(libs)


def check_headers(cflags):
    dirs = [f[2:] for f in cflags if f.startswith("-I")] + ["/usr/include", "/usr/local/include"]
    if not any(os.path.exists(os.path.join(d, "openssl", "evp.h")) for d in dirs):
        sys.exit("espdp: OpenSSL headers (openssl/evp.h) not found; install libssl-dev "
                 "(apt-get install libssl-dev) or set ESPDP_OPENSSL_CFLAGS/ESPDP_OPENSSL_LIBS")


def extensions():
    from Cython.Build import cythonize

    cflags, libs = openssl_flags()
    check_headers(cflags)
    compile_args = ["-O3"] + cflags
    link_args = list(libs)
    debug = os.environ.get("ESPDP_CYTHON_DEBUG") == "1"
    macros = [("CYTHON_TRACE_NOGIL", "1")] if debug else []
    if os.environ.get("ESPDP_SANITIZE") == "1":
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1", "-g"]
        compile_args += san
        link_args += san
    exts = [
        Extension(f"espdp.{name}", [f"src_cython/espdp/{name}.pyx"],
                  extra_compile_args=compile_args, extra_link_args=link_args,
                  define_macros=macros)
        for name in MODULES
    ]
    return cythonize(
        exts,
        include_path=["src_cython"],
        annotate=debug,
        compiler_directives={"language_level": 3, "linetrace": debug},
    )


setup(ext_modules=extensions())
