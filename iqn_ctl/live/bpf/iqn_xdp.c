/* IQN data plane: spot candidate packets (the OTT server's HTTP/3 "200 OK"
 * answers to the viewer's autoplay toggles) on a router interface.
 *
 * A candidate is a UDP datagram from IQN_PORT whose Ethernet frame length
 * (iqn_band_len) lies in [IQN_MIN_SIZE, IQN_MAX_SIZE]. Candidates the
 * forgery guard admits are grouped into bursts in the kernel (burst_add: up
 * to IQN_BURST_N of one flow, each at most IQN_BURST_GAP_NS after the
 * previous one) and each burst is written as one record {flow key, first and
 * last time, count, every candidate's offset} to a BPF ring buffer read by
 * user space, where the stall inference runs. A burst that stays short is
 * read by user space from the memory-mapped burst table once its gap has
 * passed (docs/dataplane.md). The UDP datagrams from IQN_PORT are also
 * counted in two plain arrays indexed by a hash of its flow and of its
 * client (vol_add; every candidate, and 1 in IQN_VOL_SAMPLE of the others,
 * weighted): no hash-map access on the non-candidate path. It always
 * returns XDP_PASS: IQN observes, it never drops or rewrites traffic.
 *
 * Parsing follows xdp-tutorial's parsing_helpers.h: a cursor walks the headers
 * and every helper checks its own bounds before reading, so the verifier can
 * prove every access and malformed frames simply stop the parse. The link
 * layer (Ethernet, VLAN tags, PPPoE, or IP first on a layer-3 device) is
 * iqn_parse.h, shared with the boost classifier (iqn_boost.c); the IP and UDP
 * helpers are here.
 *
 * Two entry points share one classifier (iqn_packet): iqn_xdp at the XDP hook
 * and iqn_tc, a TC (clsact) classifier for interfaces whose XDP hook is taken
 * by another program, or where XDP is not available. Each entry only says
 * where the frame is and how long it was on the wire (iqn_band_len); the
 * parse and every decision are the same code, so both hooks write the same
 * burst records. A third, iqn_xdp_move, is iqn_xdp plus the handover step
 * below, attached only while the agent moves from TC back to XDP.
 *
 * Compile-time constants (-D from iqn_ctl.live.datapath): IQN_PORT, IQN_MIN_SIZE,
 * IQN_MAX_SIZE, IQN_MAX_FLOWS, IQN_RING_PAGES, IQN_WAKEUP_BYTES, IQN_L3,
 * IQN_BURST_N, IQN_BURST_GAP_NS, IQN_BURST_MAX, IQN_BURST_SLOTS,
 * IQN_VOL_SLOTS, IQN_VOL_SAMPLE, IQN_NCPU, and the forgery guard's IQN_PAIRING,
 * IQN_PAIR_WINDOW_NS, IQN_PAIR_CREDITS, IQN_CAP_NS, IQN_CAP_DEPTH. Each has a
 * default below (IQN_L3's is in iqn_parse.h), so the file also compiles with
 * bcc on its own, given -I of this directory.
 *
 * The forgery guard (docs/dataplane.md, "Forged signals"): a second entry,
 * iqn_tc_egress, runs as a TC classifier at the same interface's egress and
 * notes every client-to-server datagram to IQN_PORT (pair_note); a candidate
 * is admitted only if its flow's client sent one within the pairing window
 * and a credit is left (pair_check), and only while its client's token
 * bucket allows (client_cap). The guard sits in iqn_packet's candidate
 * branch, before burst_add, so both the XDP and the TC ingress entries are
 * guarded and a candidate it does not admit never enters a burst.
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>

#include "iqn_parse.h"

#ifndef IQN_PORT
#define IQN_PORT 443
#endif
#ifndef IQN_MIN_SIZE
#define IQN_MIN_SIZE 1180
#endif
#ifndef IQN_MAX_SIZE
#define IQN_MAX_SIZE 1288
#endif
#ifndef IQN_MAX_FLOWS
#define IQN_MAX_FLOWS 65536
#endif
/* ring buffer size in 4 KiB pages (a power of two), shared by all CPUs */
#ifndef IQN_RING_PAGES
#define IQN_RING_PAGES 4096
#endif
/* wake the reader once this many bytes of records wait (burst records of 128 bytes) */
#ifndef IQN_WAKEUP_BYTES
#define IQN_WAKEUP_BYTES (16 * 128)
#endif

/* a burst closes at this many candidates (the signal's n, --n) */
#ifndef IQN_BURST_N
#define IQN_BURST_N 4
#endif
/* ... or when the flow's next candidate comes later than this (engine/params.py BURST_GAP) */
#ifndef IQN_BURST_GAP_NS
#define IQN_BURST_GAP_NS 4000000
#endif
/* candidate times a burst record holds (engine/params.py BURST_MAX; fixes the record's layout) */
#ifndef IQN_BURST_MAX
#define IQN_BURST_MAX 12
#endif
/* open-burst slots per CPU (a power of two) */
#ifndef IQN_BURST_SLOTS
#define IQN_BURST_SLOTS 1024
#endif
/* volume counter slots, for flows and for clients (a power of two) */
#ifndef IQN_VOL_SLOTS
#define IQN_VOL_SLOTS 65536
#endif
/* non-candidate datagrams from IQN_PORT are counted 1 in this many (a power of
 * two; 1: every one), each as this many (vol_sample, docs/dataplane.md) */
#ifndef IQN_VOL_SAMPLE
#define IQN_VOL_SAMPLE 8
#endif
/* CPUs the per-CPU slices are made for (the kernel's possible CPUs) */
#ifndef IQN_NCPU
#define IQN_NCPU 64
#endif

/* Forgery guard. IQN_PAIRING 1: a candidate needs a recent client packet on
 * its flow (0 for one-directional taps: no egress program, nothing checked). */
#ifndef IQN_PAIRING
#define IQN_PAIRING 1
#endif
/* how long after the client's last packet to the server port its flow may
 * carry candidates: an RTT plus the server's answer time plus path jitter
 * (the paper measures ~1 s), with room to spare */
#ifndef IQN_PAIR_WINDOW_NS
#define IQN_PAIR_WINDOW_NS 2000000000ULL
#endif
/* credits a flow can bank (one per client packet, one spent per candidate):
 * a flow carries at most this many more candidates than its client sent packets */
#ifndef IQN_PAIR_CREDITS
#define IQN_PAIR_CREDITS 16
#endif
/* per-client token bucket on accepted candidates: one token every IQN_CAP_NS
 * (0: no cap), at most IQN_CAP_DEPTH banked */
#ifndef IQN_CAP_NS
#define IQN_CAP_NS 5000000ULL
#endif
#ifndef IQN_CAP_DEPTH
#define IQN_CAP_DEPTH 200
#endif

#define IQN_IP_MF 0x2000
#define IQN_IP_OFFSET 0x1FFF

/* Layout described for user space by iqn_ctl/live/layout.py (FlowKeyC, checked
 * against this struct when the program loads): 40 bytes, no holes, so
 * user space can use the raw bytes as the map key. Addresses are in network
 * order; an IPv4 address fills the first 4 bytes and the rest stay zero.
 * Ports are in network order, as on the wire. */
struct flow_key {
    __u8 saddr[16];   /* server (source of candidates) */
    __u8 daddr[16];   /* client */
    __be16 sport;
    __be16 dport;
    __u8 family;      /* 4 or 6 */
    __u8 proto;       /* IPPROTO_UDP */
    __u8 pad[2];
};

/* Volume of the UDP datagrams from IQN_PORT of one flow (vol_flow) or to one
 * client (vol_client), in the slot its hash picks (layout.py VolC, ClientVolC).
 * A slot belongs to the flow (client) whose admitted candidate last claimed it: `tag`
 * is the rest of that hash, and packets of others hashing there are not
 * counted. So a flow's counters are exact from its first candidate on, until
 * another flow's candidate takes the slot; user space then sees a different
 * tag and treats the counters as unknown, as it did for an LRU eviction. */
struct vol {
    __u64 packets;
    __u64 candidates;
    __u64 bytes;
    __u32 tag;         /* 0: never claimed */
    __u32 claims;      /* times the slot was claimed: a flow that lost and won it back restarts */
};

struct client_vol {
    __u64 packets;
    __u64 candidates;
    __u64 bytes;
    __u32 tag;
    __u32 claims;
    __u8 server[16];   /* source of the client's last non-candidate datagram */
};

/* An open burst in its slot, and the ring record it becomes (layout.py
 * BurstC): 120 bytes, 128 with the ring's 8-byte header. The key comes first
 * so user space can slice it off as is. `lock` is odd while the kernel writes
 * the slot (a sequence lock for the user-space reader of the mapped table);
 * `gen` numbers the bursts of a slot, so a burst user space already read
 * from the table is recognised when its record arrives. */
struct burst {
    struct flow_key key;
    __u64 first_ns;    /* CLOCK_MONOTONIC of the first candidate */
    __u64 last_ns;     /* ... of the last */
    __u32 count;       /* candidates; 0: the slot holds no open burst */
    __u32 slot;        /* index in `bursts` */
    __u32 gen;
    __u32 lock;
    __u32 off[IQN_BURST_MAX];  /* candidate i at first_ns + off[i] */
};

enum iqn_counter {
    CNT_PACKETS = 0,
    CNT_CANDIDATES = 1,
    CNT_PARSE_ERRORS = 2,
    CNT_LOST = 3,      /* candidates in burst records the ring had no room for */
    CNT_UNPAIRED = 4,  /* candidates with no recent client packet (or credit) on their flow */
    CNT_CAPPED = 5,    /* paired candidates over their client's token bucket */
    CNT_CLIENT = 6,    /* client-to-server datagrams to IQN_PORT seen at egress */
    CNT_BURSTS = 7,    /* burst records written to the ring */
    CNT_MAX = 8,
};

/* What the egress program knows of a flow's client (flow key oriented
 * server -> client, as the XDP side builds it). */
struct pair_state {
    __u64 last_ns;    /* CLOCK_MONOTONIC (coarse) of the client's last datagram to IQN_PORT */
    __s64 credits;    /* client datagrams not yet matched by a candidate, capped */
};

struct client_key {
    __u8 addr[16];
    __u8 family;
    __u8 pad[3];
};

BPF_PERCPU_ARRAY(counters, __u64, CNT_MAX);
BPF_RINGBUF_OUTPUT(events, IQN_RING_PAGES);
/* Plain arrays, no hash maps (the guard's below are only reached by candidates): the verifier inlines every look-up, and user
 * space reads them through a memory map, without a system call. The burst
 * table is sliced per CPU (index cpu * IQN_BURST_SLOTS + hash), so each
 * slot has one writer. The volume arrays are shared: a flow's packets come
 * in on one CPU (RSS), and plain adds of two CPUs racing on one slot would
 * only lose a count. */
BPF_F_TABLE("array", __u32, struct burst, bursts, IQN_NCPU * IQN_BURST_SLOTS, BPF_F_MMAPABLE);
BPF_F_TABLE("array", __u32, struct vol, vol_flow, IQN_VOL_SLOTS, BPF_F_MMAPABLE);
BPF_F_TABLE("array", __u32, struct client_vol, vol_client, IQN_VOL_SLOTS, BPF_F_MMAPABLE);

/* the guard's tables take one entry when their check is compiled out */
#define IQN_PAIR_FLOWS (IQN_PAIRING ? IQN_MAX_FLOWS : 1)
#define IQN_CAP_CLIENTS (IQN_CAP_NS ? IQN_MAX_FLOWS : 1)
BPF_TABLE("lru_hash", struct flow_key, struct pair_state, pairs, IQN_PAIR_FLOWS);
BPF_TABLE("lru_hash", struct client_key, __u64, client_tat, IQN_CAP_CLIENTS);

/* The move from TC back to XDP (the attach watchdog, once the foreign XDP
 * program that put IQN on TC is gone): user space arms the handover, then
 * attaches iqn_xdp_move, then removes iqn_tc, then swaps iqn_xdp_move for
 * iqn_xdp in one step (datapath.py, finish_move_to_xdp). While XDP and TC
 * are both attached every frame would pass iqn_packet twice (XDP, then TC
 * ingress: a candidate counted twice). So the first frame iqn_xdp_move sees
 * while armed flips it to HANDOVER_XDP, and from then on iqn_tc leaves every
 * frame alone: a frame runs XDP then TC on one CPU, so none is counted twice.
 * The only frames it can miss are those already past the XDP hook (queued
 * for the stack) when iqn_xdp_move first ran. iqn_xdp never reads the flag:
 * its one look-up per frame is what the steady state saves. Never armed
 * otherwise (BPF_PROG_TEST_RUN of any entry leaves it alone); going to TC
 * clears it. */
enum { HANDOVER_OFF = 0, HANDOVER_ARMED = 1, HANDOVER_XDP = 2 };
BPF_ARRAY(handover, __u32, 1);

static __always_inline void count(__u32 idx)
{
    __u64 *c = counters.lookup(&idx);
    if (c)
        *c += 1;  /* per-CPU slot: no atomics needed */
}

/* count(CNT_PACKETS), returning this CPU's packet number before it: the
 * sequence the volume sampling picks from */
static __always_inline __u64 count_packet(void)
{
    __u32 idx = CNT_PACKETS;
    __u64 *c = counters.lookup(&idx);
    if (!c)
        return 0;
    __u64 seq = *c;
    *c = seq + 1;
    return seq;
}

static __always_inline void count_n(__u32 idx, __u64 n)
{
    __u64 *c = counters.lookup(&idx);
    if (c)
        *c += n;
}

/* Batched wake-ups. A wake-up per record costs the kernel far more than the
 * record (irq_work, then waking a task), and user space can act only once a
 * signal's n packets are there anyway. So a record wakes the reader only when
 * it lifts the unread data to IQN_WAKEUP_BYTES; below that the reader finds
 * the records at its poll timeout. bcc 0.26 has no events.ringbuf_query(),
 * but its rewriter turns events.ringbuf_output(...) into the text
 * bpf_ringbuf_output(<map pointer>, ...) and compiles that again: the macro
 * below catches it, so this function gets the map pointer to query. */
static __always_inline long iqn_ringbuf_output(void *ring, void *data, __u64 size)
{
    __u64 waiting = bpf_ringbuf_query(ring, BPF_RB_AVAIL_DATA);
    __u64 rec = (size + 8 + 7) & ~7ULL;  /* header + data, 8-byte aligned */
    __u64 flags = waiting < IQN_WAKEUP_BYTES && waiting + rec >= IQN_WAKEUP_BYTES
                      ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
    return (bpf_ringbuf_output)(ring, data, size, flags);
}
#define bpf_ringbuf_output(ring, data, size, flags) iqn_ringbuf_output(ring, data, size)

/* The length the size band compares, computed here and nowhere else. The band
 * is defined on the Ethernet frame as it crossed the wire (headers and VLAN
 * tags included, no FCS): on an Ethernet device that is the frame's length;
 * a layer-3 device's frame is the IP packet, which counts as the IP length
 * plus the 14 bytes of an Ethernet header (the rule replay uses for raw-IP and
 * cooked captures, iqn_ctl/capture/classify.py:_band_size). A PPPoE session
 * frame counts the same way, as its IP packet (the length its PPPoE header
 * gives, parse_pppoehdr) plus 14: the band then does not depend on whether
 * the agent sees the session on the Ethernet side or on the ppp device, nor
 * on VLAN tags around it. ``wire_len`` is what the entry point measured: the
 * whole frame, tags included. Returns 0 for a PPPoE frame shorter than its
 * header says (malformed: a parse error). That check compares with wire_len,
 * which at TC counts an offloaded VLAN tag that the data lacks: a frame up to
 * 4 bytes short may pass there; its band length is still its header's. */
static __always_inline __u32 iqn_band_len(struct hdr_cursor *nh, __u32 wire_len)
{
#if IQN_L3
    return wire_len + ETH_HLEN;
#else
    if (nh->ip_len) {
        if (nh->ip_off + nh->ip_len > wire_len)
            return 0;
        return nh->ip_len + ETH_HLEN;
    }
    return wire_len;
#endif
}

/* IPv4 header including options (IHL). Returns the L4 protocol, 0 for a UDP
 * fragment (never a candidate: only the first carries the UDP header, and its
 * length says nothing about the datagram), or PARSE_BAD. The common first
 * byte, 0x45 (version 4, no options: 20 bytes, within the bounds just
 * checked), costs one compare; any other is checked in full. Other protocols
 * leave before the fragment test, which only UDP needs (bench_xdp.py). */
static __always_inline int parse_iphdr(struct hdr_cursor *nh, void *data_end,
                                       struct iphdr **iphdr)
{
    struct iphdr *iph = nh->pos;
    if ((void *)(iph + 1) > data_end)
        return PARSE_BAD;
    int hdrsize = sizeof(*iph);
    if (*(__u8 *)iph != 0x45) {
        if (iph->version != 4 || iph->ihl < 5)
            return PARSE_BAD;
        hdrsize = iph->ihl * 4;
        if (nh->pos + hdrsize > data_end)
            return PARSE_BAD;
    }
    nh->pos += hdrsize;
    *iphdr = iph;
    if (iph->protocol != IPPROTO_UDP)
        return iph->protocol;
    if (iph->frag_off & bpf_htons(IQN_IP_MF | IQN_IP_OFFSET))
        return 0;
    return IPPROTO_UDP;
}

/* Fixed IPv6 header only: a datagram behind extension headers is not a
 * candidate (the OTT servers' answers carry none), so nexthdr must be UDP. */
static __always_inline int parse_ip6hdr(struct hdr_cursor *nh, void *data_end,
                                        struct ipv6hdr **ip6hdr)
{
    struct ipv6hdr *ip6h = nh->pos;
    if ((void *)(ip6h + 1) > data_end)
        return PARSE_BAD;
    if (ip6h->version != 6)
        return PARSE_BAD;
    nh->pos = ip6h + 1;
    *ip6hdr = ip6h;
    return ip6h->nexthdr;
}

static __always_inline int parse_udphdr(struct hdr_cursor *nh, void *data_end,
                                        struct udphdr **udphdr)
{
    struct udphdr *h = nh->pos;
    if ((void *)(h + 1) > data_end)
        return PARSE_BAD;
    nh->pos = h + 1;
    *udphdr = h;
    return 0;
}

/* ---- flow hashes: the slot of a flow (or client) in the arrays below ----
 * Computed from the header fields as if from struct flow_key's five 64-bit
 * little-endian words w0..w4 (saddr, daddr, then ports/family/proto), so
 * user space gets the same slot from a raw key (layout.py flow_hash). */
static __always_inline __u64 iqn_mix(__u64 x)
{
    x ^= x >> 29;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 32;
    return x;
}

/* low bits: the slot; high 32 bits (| 1, never 0): the tag */
static __always_inline __u64 flow_hash(__u64 s, __u64 d, __u64 w4)
{
    return iqn_mix((s * 0x9e3779b97f4a7c15ULL) ^ d ^ w4);
}

static __always_inline __u64 client_hash(__u64 d)
{
    return iqn_mix(d ^ 0x5851f42d4c957f2dULL);
}

/* ---- non-candidate accounting: per-flow and per-client volume ----
 * Two inlined array look-ups, a tag compare and plain adds: what the
 * bulk-flow filter (vol_flow) and the watched-time sampler (vol_client)
 * need, with no hash-map access, for the UDP datagrams from IQN_PORT.
 * `w`: how many datagrams this one stands for (1 for a candidate,
 * IQN_VOL_SAMPLE for a sampled non-candidate); `claim`: a candidate the
 * guard admitted, which may take the slot. */
static __always_inline void vol_add(__u64 fh, __u64 ch, __u32 len, __u32 w, int cand, int claim,
                                    __u64 s0, __u64 s1)
{
    __u64 nbytes = (__u64)w * len;
    __u32 i = (__u32)fh & (IQN_VOL_SLOTS - 1);
    __u32 tag = (__u32)(fh >> 32) | 1;
    struct vol *v = vol_flow.lookup(&i);
    if (v) {
        if (v->tag == tag) {
            v->packets += w;
            v->candidates += cand;
            v->bytes += nbytes;
        } else if (claim) {  /* an admitted candidate claims the slot for its flow */
            v->tag = tag;
            v->claims += 1;
            v->packets = 1;
            v->candidates = 1;
            v->bytes = len;
        }
    }
    i = (__u32)ch & (IQN_VOL_SLOTS - 1);
    tag = (__u32)(ch >> 32) | 1;
    struct client_vol *c = vol_client.lookup(&i);
    if (c) {
        if (c->tag == tag) {
            c->packets += w;
            c->candidates += cand;
            c->bytes += nbytes;
            if (!cand) {
                __u64 *srv = (__u64 *)c->server;
                srv[0] = s0;
                srv[1] = s1;
            }
        } else if (claim) {
            c->tag = tag;
            c->claims += 1;
            c->packets = 1;
            c->candidates = 1;
            c->bytes = len;
        }
    }
}

/* ---- signal shaping: candidates -> burst records ---- */

/* Compiler barrier: the stores on either side reach memory in program order
 * (x86 keeps stores in order), which the table's reader relies on. */
#define iqn_barrier() asm volatile("" ::: "memory")

static __always_inline int key_eq(const struct flow_key *a, const struct flow_key *b)
{
    const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;
    return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3] && x[4] == y[4];
}

/* Write the slot's burst to the ring and close it. A full ring drops the
 * record: its candidates are counted lost here, where it happens. */
static __always_inline void burst_emit(struct burst *b)
{
    __u32 c = b->count;
    if (events.ringbuf_output(b, sizeof(*b), 0) < 0)
        count_n(CNT_LOST, c);
    else
        count(CNT_BURSTS);
    b->count = 0;
}

/* One candidate of flow `key` at `now`, in this CPU's slot for the flow. It
 * extends the open burst there if that is the same flow's, has room and
 * ended at most IQN_BURST_GAP_NS ago; otherwise that burst is written out and
 * a new one starts. A burst of IQN_BURST_N goes out at once. A burst left
 * short stays in its slot until the flow's next candidate or another flow's
 * takes the slot; user space reads it from the mapped table meanwhile, once
 * its gap has passed (datapath.py, Datapath.poll_bursts). */
static __always_inline void burst_add(const struct flow_key *key, __u64 now, __u32 cpu, __u64 fh)
{
    __u32 idx = cpu * IQN_BURST_SLOTS + ((__u32)fh & (IQN_BURST_SLOTS - 1));
    struct burst *b = bursts.lookup(&idx);
    if (!b)
        return;
    __u32 c = b->count;
    if (c) {
        if (c < IQN_BURST_N && c < IQN_BURST_MAX && now - b->last_ns <= IQN_BURST_GAP_NS &&
            key_eq(&b->key, key)) {
            b->lock += 1;
            iqn_barrier();
            b->off[c] = (__u32)(now - b->first_ns);
            b->last_ns = now;
            b->count = c + 1;
            iqn_barrier();
            b->lock += 1;
            if (c + 1 >= IQN_BURST_N)
                burst_emit(b);
            return;
        }
        burst_emit(b);
    }
    b->lock += 1;
    iqn_barrier();
    b->key = *key;
    b->first_ns = now;
    b->last_ns = now;
    b->off[0] = 0;
    b->slot = idx;
    b->gen += 1;
    b->count = 1;
    iqn_barrier();
    b->lock += 1;
    if (IQN_BURST_N <= 1)
        burst_emit(b);
}

/* Forgery guard, XDP side: may this candidate's flow carry a candidate now?
 * Yes if its client sent a datagram to the server port within the pairing
 * window and a credit is left (spent here). An off-path sender must guess
 * the client's ephemeral port and time, and even then gets no more
 * candidates through than the client sent packets. */
static __always_inline int pair_check(struct flow_key *key, __u64 now)
{
#if IQN_PAIRING
    struct pair_state *ps = pairs.lookup(key);
    if (!ps)
        return 0;
    __u64 last = ps->last_ns;
    if (now > last && now - last > IQN_PAIR_WINDOW_NS)
        return 0;
    /* racing CPUs may take the last credit together: then it goes below
     * zero and the next client packets pay it back */
    if (ps->credits <= 0)
        return 0;
    __sync_fetch_and_add(&ps->credits, -1);
#endif
    return 1;
}

/* Per-client flood cap on accepted candidates: a token bucket kept as a
 * theoretical arrival time (GCRA), one u64 per client address. Unpaired
 * candidates never get here, so a forged flood cannot spend a real viewer's
 * tokens. Concurrent CPUs may both pass on the last token: the cap is a
 * bound on load, not an exact count. */
static __always_inline int client_cap(struct flow_key *key, __u64 now)
{
#if IQN_CAP_NS
    struct client_key ck = {};
    __builtin_memcpy(ck.addr, key->daddr, 16);
    ck.family = key->family;
    __u64 *tat = client_tat.lookup(&ck);
    if (!tat) {
        __u64 next = now + IQN_CAP_NS;
        client_tat.update(&ck, &next);
        return 1;
    }
    __u64 t = *tat > now ? *tat : now;
    if (t - now > (__u64)(IQN_CAP_DEPTH - 1) * IQN_CAP_NS)
        return 0;
    *tat = t + IQN_CAP_NS;
#endif
    return 1;
}

/* The one call site of the guard, in the candidate branch: 1 to emit. */
static __always_inline int admit_candidate(struct flow_key *key, __u64 now)
{
    if (!pair_check(key, now)) {
        count(CNT_UNPAIRED);
        return 0;
    }
    if (!client_cap(key, now)) {
        count(CNT_CAPPED);
        return 0;
    }
    return 1;
}

/* The per-packet work of both hooks: [data, data_end) is the frame from its
 * first header (Ethernet, or IP on a layer-3 device), ``wire_len`` its length
 * on the wire (see iqn_band_len). Never changes the packet. */
static __always_inline void iqn_packet(void *data, void *data_end, __u32 wire_len)
{
    struct hdr_cursor nh = { .pos = data };
    struct iphdr *iph = NULL;
    struct ipv6hdr *ip6h = NULL;
    struct udphdr *udph;
    int l4;

    __u64 seq = count_packet();

    int eth_type = parse_first(&nh, data_end);
    if (eth_type == bpf_htons(ETH_P_IP)) {
        l4 = parse_iphdr(&nh, data_end, &iph);
    } else if (eth_type == bpf_htons(ETH_P_IPV6)) {
        l4 = parse_ip6hdr(&nh, data_end, &ip6h);
    } else {
        l4 = eth_type == PARSE_BAD ? PARSE_BAD : 0;
    }
    if (l4 != IPPROTO_UDP)
        goto out;
    if (parse_udphdr(&nh, data_end, &udph) == PARSE_BAD) {
        l4 = PARSE_BAD;
        goto out;
    }
    if (udph->source != bpf_htons(IQN_PORT))
        return;

    /* A server-to-client datagram from the signalling port: count its
     * volume, and group it into a burst if it is a candidate the guard
     * admits. The slot hashes take the addresses as the key's 64-bit words
     * (an IPv4 address fills the low half of the first, as in struct
     * flow_key). */
    __u32 len = iqn_band_len(&nh, wire_len);
    if (!len) {  /* a PPPoE frame shorter than its header says */
        l4 = PARSE_BAD;
        goto out;
    }
    int cand = len >= IQN_MIN_SIZE && len <= IQN_MAX_SIZE;
    /* Volume sampling: of the non-candidates, 1 in IQN_VOL_SAMPLE goes on,
     * counted for IQN_VOL_SAMPLE; the rest stop here, before any table. The
     * bulk rule and the watched-time sampler compare volumes of thousands of
     * bytes, which the estimate keeps (bench_xdp.py measures what it misses).
     * The pick hashes this CPU's packet number rather than taking every
     * IQN_VOL_SAMPLE-th: two flows paced alike arrive interleaved, and a
     * fixed stride then lands on the same one every time (one viewer counted
     * twice, the other never: seen in CI as 3 s watched of 7). */
    if (!cand && ((iqn_mix(seq) >> 40) & (IQN_VOL_SAMPLE - 1)))
        return;
    __u64 s0, s1 = 0, d, w4;
    __u8 family;
    if (iph) {
        family = 4;
        s0 = iph->saddr;
        d = iph->daddr;
    } else if (ip6h) {
        family = 6;
        const __u64 *sa = (const __u64 *)&ip6h->saddr, *da = (const __u64 *)&ip6h->daddr;
        s0 = sa[0];
        s1 = sa[1];
        d = da[0] ^ da[1];
    } else {
        return;
    }
    w4 = (__u64)udph->source | (__u64)udph->dest << 16 | (__u64)family << 32 | (__u64)IPPROTO_UDP << 40;
    __u64 fh = flow_hash(s0 ^ s1, d, w4);
    if (!cand) {
        vol_add(fh, client_hash(d), len, IQN_VOL_SAMPLE, 0, 0, s0, s1);
        return;
    }

    count(CNT_CANDIDATES);
    struct flow_key key __attribute__((aligned(8))) = {};
    key.sport = udph->source;
    key.dport = udph->dest;
    key.proto = IPPROTO_UDP;
    key.family = family;
    if (iph) {
        __builtin_memcpy(key.saddr, &iph->saddr, 4);
        __builtin_memcpy(key.daddr, &iph->daddr, 4);
    } else if (ip6h) {
        __builtin_memcpy(key.saddr, &ip6h->saddr, 16);
        __builtin_memcpy(key.daddr, &ip6h->daddr, 16);
    }
    __u64 now = bpf_ktime_get_ns();
    /* the guard first: a candidate it keeps back is counted as volume but
     * claims no slot (a forged flood cannot evict a viewer's counters) and
     * never enters a burst */
    int admitted = admit_candidate(&key, now);
    vol_add(fh, client_hash(d), len, 1, 1, admitted, s0, s1);
    if (!admitted)
        return;
    __u32 cpu = bpf_get_smp_processor_id();
    if (cpu >= IQN_NCPU)
        return;  /* cannot happen: IQN_NCPU is the kernel's possible CPUs */
    burst_add(&key, now, cpu, fh);
    return;

out:
    if (l4 == PARSE_BAD)
        count(CNT_PARSE_ERRORS);
}

/* XDP: the frame is linear (the program is not frags-aware, so XDP hands it
 * whole) and starts at the first header; VLAN tags are in the data. ``move``
 * is a constant, so each entry below is compiled with or without the
 * handover step: iqn_xdp, attached in the steady state, reads no handover
 * flag; iqn_xdp_move is attached only for the move from TC back to XDP
 * (Datapath.begin_move_to_xdp) and replaced by iqn_xdp once the TC
 * classifier is gone (finish_move_to_xdp). The flag is read on every frame
 * only while the move lasts. */
static __always_inline int iqn_xdp_entry(struct xdp_md *ctx, const int move)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;

    if (move) {
        __u32 k = 0;
        __u32 *h = handover.lookup(&k);
        if (h && *h == HANDOVER_ARMED)
            *h = HANDOVER_XDP;  /* a read, not a write, on every other frame: no shared line bouncing */
    }
    iqn_packet(data, data_end, (__u32)(data_end - data));
    return XDP_PASS;
}

int iqn_xdp(struct xdp_md *ctx)
{
    return iqn_xdp_entry(ctx, 0);
}

int iqn_xdp_move(struct xdp_md *ctx)
{
    return iqn_xdp_entry(ctx, 1);
}

/* Header bytes the parse may need: Ethernet + 2 tags + PPPoE + IPv4 with options + UDP */
#define IQN_HDR_MAX (ETH_HLEN + 8 + 8 + 60 + 8)
/* The shortest headers a candidate has: Ethernet (none on a layer-3 device),
 * IPv4, UDP. Drivers put at least the headers they parsed in the linear part
 * (eth_get_headlen); one that leaves less (only the Ethernet header, say) gets
 * the headers pulled. */
#define IQN_HDR_MIN ((IQN_L3 ? 0 : ETH_HLEN) + 20 + 8)

/* TC (clsact ingress or egress, direct action). Two differences from XDP, so
 * that the same frame gets the same length and the same parse on both hooks:
 * - skb->len counts the whole packet; data_end - data only its linear part
 *   (a datagram sent with sendfile/splice arrives with its payload in page
 *   frags). A non-linear skb whose linear part is shorter than IQN_HDR_MIN is
 *   pulled (bpf_skb_pull_data, up to IQN_HDR_MAX bytes; it may copy, so only
 *   then); the length stays skb->len.
 * - VLAN offload: on most drivers (veth too) the outer tag is not in the data
 *   but in skb->vlan_tci (vlan_present), so skb->len is 4 bytes short of the
 *   frame that crossed the wire; it is added back. The parse then sees the
 *   inner ethertype directly, as it would after the tag.
 * The verdict is always TC_ACT_UNSPEC, "no verdict": the next classifier on
 * the hook runs as if IQN were not there, and with none left the packet goes
 * on. (TC_ACT_OK would end the chain: every classifier after IQN's would stop
 * seeing packets; and one before it that returns TC_ACT_OK hides them from
 * IQN, which is why the loader puts IQN's first.) */
int iqn_tc(struct __sk_buff *skb)
{
    __u32 wire_len = skb->len;
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    __u32 k = 0;
    __u32 *h = handover.lookup(&k);

    if (h && *h == HANDOVER_XDP)
        return TC_ACT_UNSPEC;  /* iqn_xdp saw this frame already (the move back to XDP) */
    if (data_end - data < IQN_HDR_MIN && skb->len > (__u32)(data_end - data)) {
        bpf_skb_pull_data(skb, skb->len < IQN_HDR_MAX ? skb->len : IQN_HDR_MAX);
        data = (void *)(long)skb->data;
        data_end = (void *)(long)skb->data_end;
    }
    if (!IQN_L3 && skb->vlan_present)
        wire_len += 4;  /* the offloaded tag: struct vlan_hdr */
    iqn_packet(data, data_end, wire_len);
    return TC_ACT_UNSPEC;
}

/* Forgery guard, egress side: a TC classifier at the egress of the same
 * interface sees the client's datagrams to the server (the reverse direction
 * of the candidates). Each one refreshes its flow's pairing time and banks a
 * credit. Keyed as the XDP side keys the flow (server -> client), so both
 * find one entry. Always TC_ACT_UNSPEC, as iqn_tc: IQN observes, never drops,
 * and never ends the classifier chain. */
static __always_inline void pair_note(struct flow_key *key, __u64 now)
{
    struct pair_state *ps = pairs.lookup(key);
    if (!ps) {
        struct pair_state fresh = { .last_ns = now, .credits = 1 };
        if (pairs.insert(key, &fresh) == 0)
            return;
        ps = pairs.lookup(key);
        if (!ps)
            return;
    }
    if (now > ps->last_ns && now - ps->last_ns > IQN_PAIR_WINDOW_NS)
        ps->credits = 1;  /* stale credits expire with the window */
    else if (ps->credits < IQN_PAIR_CREDITS)
        __sync_fetch_and_add(&ps->credits, 1);
    ps->last_ns = now;
}

int iqn_tc_egress(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct hdr_cursor nh = { .pos = data };
    struct iphdr *iph = NULL;
    struct ipv6hdr *ip6h = NULL;
    struct udphdr *udph;
    int l4;

    /* the same first parser as the candidate side (IQN_L3) */
    int eth_type = parse_first(&nh, data_end);
    if (eth_type == bpf_htons(ETH_P_IP))
        l4 = parse_iphdr(&nh, data_end, &iph);
    else if (eth_type == bpf_htons(ETH_P_IPV6))
        l4 = parse_ip6hdr(&nh, data_end, &ip6h);
    else
        return TC_ACT_UNSPEC;
    if (l4 != IPPROTO_UDP || parse_udphdr(&nh, data_end, &udph) == PARSE_BAD)
        return TC_ACT_UNSPEC;
    if (udph->dest != bpf_htons(IQN_PORT))
        return TC_ACT_UNSPEC;

    count(CNT_CLIENT);
    /* the flow as the XDP side keys it: server -> client */
    struct flow_key key = {};
    key.sport = udph->dest;
    key.dport = udph->source;
    key.proto = IPPROTO_UDP;
    if (iph) {
        key.family = 4;
        __builtin_memcpy(key.saddr, &iph->daddr, 4);
        __builtin_memcpy(key.daddr, &iph->saddr, 4);
    } else if (ip6h) {
        key.family = 6;
        __builtin_memcpy(key.saddr, &ip6h->daddr, 16);
        __builtin_memcpy(key.daddr, &ip6h->saddr, 16);
    }
    pair_note(&key, bpf_ktime_get_coarse_ns());
    return TC_ACT_UNSPEC;
}
