"""The XDP "live frames" sender for bench/blast.c (``--sender xdp``).

Why: blast's AF_PACKET path costs about a microsecond of the sender's CPU per
frame (an skb, the socket layer, veth's xmit), and on a 2-CPU box that CPU also
runs the veth's receive path and the XDP program under test, so it offers at
most ~400k frames/s. BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES (kernel
>= 5.18; the way xdp-trafficgen sends) runs an XDP program on frames from a page
pool in the kernel and honours its verdict: XDP_REDIRECT to the veth sends the
frame through veth's ndo_xdp_xmit, with no skb and no socket.

How the two halves split: blast keeps its scheduler (flows, stalls, phases,
counts, log) and, instead of building an iovec per frame, writes the frame's
length and 42 header bytes (Ethernet + IPv4 + UDP, checksum done) into slot i
of the mmapped array map ``gen``; one test run with repeat = the number of due
frames then sends them, this program copying slot ``next++`` over each frame.
The kernel copies the template frame into a pool page once and keeps what the
program wrote there, so the program writes every byte that varies (the whole
header) and trims the frame to its length (candidate vs video size) with
``bpf_xdp_adjust_tail``; the payload is zeros, as in the AF_PACKET path.

bcc compiles and loads the program here (the box has no clang binary for a
libbpf object); blast gets the program's and the map's descriptors as inherited
file descriptors (``xdp_prog=FD xdp_map=FD``) and does the rest with bpf(2).

The receiving veth must have NAPI on to take XDP frames (veth's rule): an XDP
program attached on the peer (the agent's, or the tests' XDP_PASS one) does it;
GRO on the peer should too (not tried: the box has no ethtool).

The generator also stamps each descriptor with bpf_ktime_get_ns() when its frame
goes out: runs wait ~28 ms in the kernel and up to 16 are in flight, so blast's
log takes a frame's send time from there, not from when it queued the frame.
The wait is the kernel's, not the generator's: a test run with repeat > 1 puts
the program into the XDP dispatcher and takes it out again afterwards, two RCU
grace periods (bench/blast.c, "Each test run costs"); repeat = 1 costs ~1 µs but
sends one frame per call.
"""

from __future__ import annotations

from typing import Any

#: frames per test run at most (the map's slots); matches XBATCH in blast.c
SLOTS = 4096
#: test runs in flight at most (the map's entries, one per blast worker thread);
#: matches XWORKERS in blast.c
WORKERS = 16
HDR = 42

SOURCE = r"""
#include <uapi/linux/bpf.h>

struct desc {
    u16 len;           /* whole frame, bytes */
    u8 hdr[42];        /* Ethernet + IPv4 + UDP header, as blast builds it */
    u8 pad[4];
    u64 sent_ns;       /* written here: when the frame went out (CLOCK_MONOTONIC) */
};
struct gen_batch {
    u32 next;          /* slot of the next frame: blast sets it to 0 per run */
    u32 ifindex;       /* where the frames go */
    struct desc d[%(SLOTS)d];
};
BPF_F_TABLE("array", u32, struct gen_batch, gen, %(WORKERS)d, BPF_F_MMAPABLE);

int gen_frame(struct xdp_md *ctx) {
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    if (data + 43 > end)
        return XDP_ABORTED;
    u32 k = ((u8 *)data)[42];   /* the worker's map entry: its template's first payload byte */
    struct gen_batch *b = gen.lookup(&k);
    if (!b)
        return XDP_ABORTED;
    u32 i = b->next;
    if (i >= %(SLOTS)d)
        return XDP_DROP;
    b->next = i + 1;
    struct desc *d = &b->d[i];
    int have = (int)(ctx->data_end - ctx->data);
    int delta = (int)d->len - have;
    if (delta < 0 && bpf_xdp_adjust_tail(ctx, delta))
        return XDP_ABORTED;
    data = (void *)(long)ctx->data;
    end = (void *)(long)ctx->data_end;
    if (data + 42 > end)
        return XDP_ABORTED;
    __builtin_memcpy(data, d->hdr, 42);
    d->sent_ns = bpf_ktime_get_ns();
    return bpf_redirect(b->ifindex, 0);
}
"""


def load() -> tuple[Any, int, int]:
    """Compile and load the generator: (the BPF object, to keep alive while the
    descriptors are in use; the program's fd; the ``gen`` map's fd)."""
    from bcc import BPF

    b = BPF(text=(SOURCE % {"SLOTS": SLOTS, "WORKERS": WORKERS}).encode())
    fn = b.load_func(b"gen_frame", BPF.XDP)
    return b, int(fn.fd), int(b[b"gen"].map_fd)
