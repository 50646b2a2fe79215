#!/bin/sh
# Build (once) the small Linux VM that is the kernel ESP peer of the interop
# tests (tests/interop/).  Prints the directory holding `vmlinuz` and
# `initrd` on its last line of stdout.
#
# Contents: Debian's linux-image-cloud-amd64 (apt-get download + dpkg-deb -x,
# never installed), busybox-static (same), the host's iproute2 `ip` with its
# shared libraries (ldd), the kernel modules ESP needs with their
# dependencies (depmod on the unpacked tree), and a static helper
# (`espinudp`, gcc -static) that holds UDP sockets with UDP_ENCAP_ESPINUDP
# so that the kernel decapsulates ESP in UDP.
#
# Cached under .cache/vm/KEY/, KEY naming the kernel, busybox and iproute2
# versions and a hash of this script; an existing complete build is reused.
# Needs: apt-get, dpkg-deb, depmod (kmod), gcc + libc6-dev, cpio, gzip.
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${ESPDP_VM_CACHE:-$ROOT/.cache/vm}
ARCH=amd64

die() { echo "build-vm: $*" >&2; exit 1; }
for tool in apt-get apt-cache dpkg-deb depmod gcc cpio gzip ldd sha256sum; do
    command -v "$tool" >/dev/null 2>&1 || die "missing tool: $tool"
done
[ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || die "iproute2's ip not found"
IPBIN=$(command -v /usr/sbin/ip /sbin/ip 2>/dev/null | head -n1)

candidate() {
    apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2; exit}'
}
KMETA_VER=$(candidate linux-image-cloud-amd64)
BB_VER=$(candidate busybox-static)
[ -n "$KMETA_VER" ] && [ "$KMETA_VER" != "(none)" ] \
    || die "apt-cache knows no linux-image-cloud-amd64 (run apt-get update?)"
[ -n "$BB_VER" ] && [ "$BB_VER" != "(none)" ] || die "apt-cache knows no busybox-static"
IP_VER=$(dpkg-query -W -f '${Version}' iproute2 2>/dev/null || echo unknown)
SELF_HASH=$(sha256sum "$0" | cut -c1-12)
KEY=$(printf 'k%s-bb%s-ip%s-%s' "$KMETA_VER" "$BB_VER" "$IP_VER" "$SELF_HASH" | tr -c 'A-Za-z0-9._+-' '_')
OUT=$CACHE/$KEY

if [ -f "$OUT/done" ]; then
    echo "$OUT"
    exit 0
fi

mkdir -p "$CACHE"
WORK=$(mktemp -d "$CACHE/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

# ------------------------------------------------------------ packages
KPKG=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
       | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$KPKG" ] || die "cannot tell which kernel linux-image-cloud-amd64 depends on"
echo "build-vm: downloading $KPKG and busybox-static ($BB_VER)" >&2
# apt-get download writes to the current directory; as root it warns about
# the _apt sandbox, which is harmless here.
chmod 0777 "$WORK"
apt-get download -q "$KPKG" busybox-static >&2 2>download.log \
    || { cat download.log >&2; die "apt-get download failed"; }
mkdir kpkg bbpkg
dpkg-deb -x "$(ls ${KPKG}_*.deb)" kpkg
dpkg-deb -x "$(ls busybox-static_*.deb)" bbpkg
KVER=$(ls kpkg/lib/modules | head -n1)
[ -n "$KVER" ] || die "no modules in $KPKG"
cp "kpkg/boot/vmlinuz-$KVER" vmlinuz

# ------------------------------------------------------------ modules
depmod -b kpkg "$KVER"
DEP=kpkg/lib/modules/$KVER/modules.dep
WANT="esp4 esp6 xfrm_user xfrm_algo xfrm4_tunnel xfrm6_tunnel tunnel4 tunnel6
      gcm ghash_generic ghash_clmulni_intel seqiv echainiv authenc authencesn
      chacha20poly1305 chacha_generic chacha_x86_64 poly1305_generic poly1305_x86_64
      aesni_intel cryptd crypto_simd sha256_generic hmac drbg jitterentropy_rng
      sha512_generic ctr cbc xfrm_interface virtio_net virtio_pci virtio_console
      ip6_tunnel"
# resolve each wanted module and its dependencies (modules.dep is
# "path: dep dep ..." with paths relative to the modules directory)
: > wanted.list
for m in $WANT; do
    line=$(grep -E "(^|/)$(echo "$m" | sed 's/_/[_-]/g')\.ko(\.[a-z]+)?:" "$DEP" | head -n1 || true)
    if [ -z "$line" ]; then
        grep -qE "(^|/)$m\.ko" "kpkg/lib/modules/$KVER/modules.builtin" \
            || echo "build-vm: note: module $m neither loadable nor built in" >&2
        continue
    fi
    echo "$line" | tr -d ':' | tr ' ' '\n' | grep . >> wanted.list
done
ROOTFS=$WORK/rootfs
MODDIR=$ROOTFS/lib/modules/$KVER
mkdir -p "$MODDIR"
sort -u wanted.list | while read -r rel; do
    mkdir -p "$MODDIR/$(dirname "$rel")"
    cp "kpkg/lib/modules/$KVER/$rel" "$MODDIR/$rel"
done
cp kpkg/lib/modules/$KVER/modules.builtin* kpkg/lib/modules/$KVER/modules.order "$MODDIR/" 2>/dev/null || true
depmod -b "$ROOTFS" "$KVER"

# ------------------------------------------------------------ userland
mkdir -p "$ROOTFS/bin" "$ROOTFS/sbin" "$ROOTFS/usr/bin" "$ROOTFS/usr/sbin" \
         "$ROOTFS/proc" "$ROOTFS/sys" "$ROOTFS/dev" "$ROOTFS/tmp" "$ROOTFS/run" \
         "$ROOTFS/etc" "$ROOTFS/root" "$ROOTFS/var/run"
cp bbpkg/bin/busybox "$ROOTFS/bin/busybox"
for applet in $("$ROOTFS/bin/busybox" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$ROOTFS/bin/$applet"
done
# the kernel's request_module() runs /sbin/modprobe (crypto templates: gcm(aes) ...)
ln -sf ../bin/busybox "$ROOTFS/sbin/modprobe"
# iproute2's ip with its libraries, under its own path (busybox's ip has no xfrm)
mkdir -p "$ROOTFS/iproute2"
cp "$IPBIN" "$ROOTFS/iproute2/ip"
ldd "$IPBIN" | awk '{for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i}' | sort -u |
while read -r lib; do
    real=$(readlink -f "$lib")
    mkdir -p "$ROOTFS$(dirname "$lib")"
    cp "$real" "$ROOTFS$lib"
done
# the lib64 loader path must exist as the binary names it
[ -e "$ROOTFS/lib64/ld-linux-x86-64.so.2" ] || {
    mkdir -p "$ROOTFS/lib64"
    cp "$(readlink -f /lib64/ld-linux-x86-64.so.2)" "$ROOTFS/lib64/ld-linux-x86-64.so.2"
}
# iproute2 reads a few tables under /etc/iproute2 (optional)
[ -d /etc/iproute2 ] && cp -r /etc/iproute2 "$ROOTFS/etc/" || true
[ -d /usr/share/iproute2 ] && mkdir -p "$ROOTFS/usr/share" && cp -r /usr/share/iproute2 "$ROOTFS/usr/share/" || true

cat > espinudp.c <<'EOF'
/* Hold UDP sockets on port 4500 (IPv4 and IPv6) with UDP_ENCAP_ESPINUDP so
 * that the kernel decapsulates ESP in UDP arriving there; then sleep.  Like
 * an IKE daemon's, the sockets bypass IPsec policies (IP_XFRM_POLICY allow,
 * both directions): the kernel checks a UDP socket's input policy before
 * the encapsulation hook, and a transport-mode policy between two hosts
 * covers their UDP 4500 too. */
#include <linux/xfrm.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#ifndef UDP_ENCAP
#define UDP_ENCAP 100
#endif
#ifndef UDP_ENCAP_ESPINUDP
#define UDP_ENCAP_ESPINUDP 2
#endif
#ifndef IP_XFRM_POLICY
#define IP_XFRM_POLICY 17
#endif
#ifndef IPV6_XFRM_POLICY
#define IPV6_XFRM_POLICY 35
#endif
static int bypass(int s, int level, int opt) {
    struct xfrm_userpolicy_info pol;
    for (int dir = XFRM_POLICY_IN; dir <= XFRM_POLICY_OUT; dir++) {
        memset(&pol, 0, sizeof pol);
        pol.action = XFRM_POLICY_ALLOW;
        pol.sel.family = level == IPPROTO_IP ? AF_INET : AF_INET6;
        pol.dir = dir;
        pol.lft.soft_byte_limit = pol.lft.hard_byte_limit = XFRM_INF;
        pol.lft.soft_packet_limit = pol.lft.hard_packet_limit = XFRM_INF;
        if (setsockopt(s, level, opt, &pol, sizeof pol) < 0)
            return -1;
    }
    return 0;
}
int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 4500, type = UDP_ENCAP_ESPINUDP, one = 1;
    struct sockaddr_in a4; struct sockaddr_in6 a6;
    int s4 = socket(AF_INET, SOCK_DGRAM, 0), s6 = socket(AF_INET6, SOCK_DGRAM, 0);
    memset(&a4, 0, sizeof a4); a4.sin_family = AF_INET; a4.sin_port = htons(port);
    memset(&a6, 0, sizeof a6); a6.sin6_family = AF_INET6; a6.sin6_port = htons(port);
    if (s4 < 0 || bind(s4, (struct sockaddr *)&a4, sizeof a4) < 0 ||
        setsockopt(s4, IPPROTO_UDP, UDP_ENCAP, &type, sizeof type) < 0 ||
        bypass(s4, IPPROTO_IP, IP_XFRM_POLICY) < 0) {
        perror("espinudp: IPv4"); return 1;
    }
    if (s6 < 0 || setsockopt(s6, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one) < 0 ||
        bind(s6, (struct sockaddr *)&a6, sizeof a6) < 0 ||
        setsockopt(s6, IPPROTO_UDP, UDP_ENCAP, &type, sizeof type) < 0 ||
        bypass(s6, IPPROTO_IPV6, IPV6_XFRM_POLICY) < 0)
        perror("espinudp: IPv6 (continuing with IPv4 only)");
    printf("espinudp: listening on %d\n", port); fflush(stdout);
    for (;;) pause();
}
EOF
gcc -static -O2 -o "$ROOTFS/bin/espinudp" espinudp.c

cat > "$ROOTFS/init" <<EOF
#!/bin/sh
# PID 1 of the interop VM: load the modules, bring eth0 up, then serve the
# host's commands on the serial console (see tests/interop/vm.py).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || true
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
echo 1 > /proc/sys/kernel/printk
for m in virtio_pci virtio_net xfrm_user esp4 esp6 xfrm4_tunnel xfrm6_tunnel ctr \\
         gcm ghash_generic ghash_clmulni_intel seqiv echainiv authenc authencesn \\
         chacha20poly1305 chacha_generic poly1305_generic cbc sha256_generic hmac \\
         sha512_generic drbg jitterentropy_rng aesni_intel; do
    modprobe \$m 2>/dev/null
done
ip link set lo up
ip link set eth0 up 2>/dev/null
exec /bin/sh /serve < /dev/ttyS0 > /dev/ttyS0 2>&1
EOF
chmod 0755 "$ROOTFS/init"

# The command server.  The serial line may lose bytes when the guest is busy
# (seen under TCG), so the host sends a command as base64 in short numbered
# chunks, each acknowledged:
#   ID D SEQ LEN DATA   -> @@ACK ID SEQ@@ (or @@NAK ID SEQ@@: send it again)
#   ID R COUNT          -> @@RUNNING ID@@ @@BEGIN ID@@ output @@END ID RC@@
cat > "$ROOTFS/serve" <<'EOF'
stty raw -echo 2>/dev/null
echo "@@READY@@"
cur=""; next=0; last=""
while IFS= read -r line; do
    set -- $line
    [ $# -ge 3 ] || continue
    id=$1; kind=$2
    case "$kind" in
    D)
        [ $# -eq 5 ] || { echo "@@NAK $id $3@@"; continue; }
        if [ "$id" != "$cur" ]; then cur=$id; next=0; : > /tmp/cmd.b64; fi
        if [ "$3" = "$next" ] && [ "${#5}" = "$4" ]; then
            printf '%s' "$5" >> /tmp/cmd.b64; next=$((next + 1)); echo "@@ACK $id $3@@"
        elif [ "$3" -lt "$next" ] 2>/dev/null; then
            echo "@@ACK $id $3@@"
        else
            echo "@@NAK $id $3@@"
        fi ;;
    R)
        if [ "$id" = "$last" ]; then echo "@@RUNNING $id@@"; continue; fi
        if [ "$id" != "$cur" ] || [ "$3" != "$next" ]; then echo "@@NAK $id R@@"; continue; fi
        last=$id
        echo "@@RUNNING $id@@"
        base64 -d < /tmp/cmd.b64 > /tmp/cmd.sh 2>/dev/null
        sh /tmp/cmd.sh > /tmp/out 2>&1 < /dev/null
        rc=$?
        echo "@@BEGIN $id@@"
        cat /tmp/out
        echo ""
        echo "@@END $id $rc@@" ;;
    esac
done
echo "@@SERVER-EXIT@@"
EOF

(cd "$ROOTFS" && find . | cpio -o -H newc --quiet | gzip -1) > initrd

mkdir -p "$OUT.tmp"
mv vmlinuz initrd "$OUT.tmp/"
printf 'kernel=%s\nbusybox=%s\niproute2=%s\n' "$KVER ($KMETA_VER)" "$BB_VER" "$IP_VER" > "$OUT.tmp/versions"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
touch "$OUT/done"
echo "build-vm: built $OUT" >&2
echo "$OUT"
