/* IQN data plane: spot candidate packets (the OTT server's HTTP/3 "200 OK"
 * answers to the viewer's autoplay toggles) on a router interface.
 *
 * A candidate is a UDP datagram from IQN_PORT whose Ethernet frame length
 * (data_end - data) lies in [IQN_MIN_SIZE, IQN_MAX_SIZE]. For each one the
 * program bumps per-flow counters in an LRU hash and writes a record
 * {flow key, bpf_ktime_get_ns(), frame length} to a BPF ring buffer read by
 * user space, where the stall inference runs. It always returns XDP_PASS: IQN observes, it never drops or
 * rewrites traffic.
 *
 * Parsing follows xdp-tutorial's parsing_helpers.h: a cursor walks the headers
 * and every helper checks its own bounds before reading, so the verifier can
 * prove every access and malformed frames simply stop the parse.
 *
 * Compile-time constants (-D from iqn_ctl.live.datapath): IQN_PORT, IQN_MIN_SIZE,
 * IQN_MAX_SIZE, IQN_MAX_FLOWS, IQN_RING_PAGES, IQN_WAKEUP_BYTES. Each has a
 * default below, so the file also compiles with bcc on its own.
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>

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
/* wake the reader once this many bytes of records wait (n records of 64 bytes) */
#ifndef IQN_WAKEUP_BYTES
#define IQN_WAKEUP_BYTES (4 * 64)
#endif

#define IQN_ETH_P_8021Q 0x8100
#define IQN_ETH_P_8021AD 0x88A8
#define IQN_VLAN_MAX_DEPTH 2
#define IQN_IP_MF 0x2000
#define IQN_IP_OFFSET 0x1FFF

/* Outcome of a parse helper: PARSE_BAD means the frame is truncated or its
 * header is invalid (counted as a parse error). */
#define PARSE_BAD (-1)

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

struct flow_stats {
    __u64 packets;     /* UDP packets from IQN_PORT in this flow, any size */
    __u64 candidates;
    __u64 bytes;       /* frame bytes of those packets */
    __u64 last_seen_ns;  /* CLOCK_MONOTONIC; coarse (one tick) unless the last packet was a candidate */
};

/* Ring buffer record (64 bytes with the ring's 8-byte header): the key comes
 * first so user space can slice it off as is. */
struct cand_event {
    struct flow_key key;
    __u64 ts_ns;
    __u32 len;
    __u32 pad;
};

enum iqn_counter {
    CNT_PACKETS = 0,
    CNT_CANDIDATES = 1,
    CNT_PARSE_ERRORS = 2,
    CNT_LOST = 3,      /* candidates the ring had no room for */
    CNT_MAX = 4,
};

BPF_TABLE("lru_hash", struct flow_key, struct flow_stats, flows, IQN_MAX_FLOWS);
BPF_PERCPU_ARRAY(counters, __u64, CNT_MAX);
BPF_RINGBUF_OUTPUT(events, IQN_RING_PAGES);

struct hdr_cursor {
    void *pos;
};

static __always_inline void count(__u32 idx)
{
    __u64 *c = counters.lookup(&idx);
    if (c)
        *c += 1;  /* per-CPU slot: no atomics needed */
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

/* Ethernet plus up to two VLAN tags (802.1Q / 802.1ad). Returns the inner
 * ethertype in network order, or PARSE_BAD when the frame is too short. */
static __always_inline int parse_ethhdr(struct hdr_cursor *nh, void *data_end)
{
    struct ethhdr *eth = nh->pos;
    if ((void *)(eth + 1) > data_end)
        return PARSE_BAD;
    nh->pos = eth + 1;
    __be16 proto = eth->h_proto;

#pragma unroll
    for (int i = 0; i < IQN_VLAN_MAX_DEPTH; i++) {
        if (proto != bpf_htons(IQN_ETH_P_8021Q) && proto != bpf_htons(IQN_ETH_P_8021AD))
            break;
        /* a VLAN tag: 2 bytes TCI, 2 bytes encapsulated ethertype */
        __be16 *vlan = nh->pos;
        if ((void *)(vlan + 2) > data_end)
            return PARSE_BAD;
        proto = vlan[1];
        nh->pos = vlan + 2;
    }
    return proto;
}

/* IPv4 header including options (IHL). Returns the L4 protocol, 0 for a
 * fragment (never a candidate: only the first carries the UDP header, and its
 * length says nothing about the datagram), or PARSE_BAD. */
static __always_inline int parse_iphdr(struct hdr_cursor *nh, void *data_end,
                                       struct iphdr **iphdr)
{
    struct iphdr *iph = nh->pos;
    if ((void *)(iph + 1) > data_end)
        return PARSE_BAD;
    if (iph->version != 4 || iph->ihl < 5)
        return PARSE_BAD;
    int hdrsize = iph->ihl * 4;
    if (nh->pos + hdrsize > data_end)
        return PARSE_BAD;
    nh->pos += hdrsize;
    *iphdr = iph;
    if (iph->frag_off & bpf_htons(IQN_IP_MF | IQN_IP_OFFSET))
        return 0;
    return iph->protocol;
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

int iqn_xdp(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct hdr_cursor nh = { .pos = data };
    struct iphdr *iph = NULL;
    struct ipv6hdr *ip6h = NULL;
    struct udphdr *udph;
    int l4;

    count(CNT_PACKETS);

    int eth_type = parse_ethhdr(&nh, data_end);
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
        return XDP_PASS;

    /* A server-to-client datagram from the signalling port: track the flow.
     * Only candidates need a precise timestamp (the inference runs on them);
     * last_seen of the bulk of the flow's packets makes do with the coarse
     * clock (same CLOCK_MONOTONIC base, one tick behind at most), which costs
     * a fraction of bpf_ktime_get_ns() on virtualised routers. */
    __u32 len = (__u32)(data_end - data);
    int cand = len >= IQN_MIN_SIZE && len <= IQN_MAX_SIZE;
    __u64 now = cand ? bpf_ktime_get_ns() : bpf_ktime_get_coarse_ns();
    struct flow_key key = {};
    key.sport = udph->source;
    key.dport = udph->dest;
    key.proto = IPPROTO_UDP;
    if (iph) {
        key.family = 4;
        __builtin_memcpy(key.saddr, &iph->saddr, 4);
        __builtin_memcpy(key.daddr, &iph->daddr, 4);
    } else if (ip6h) {
        key.family = 6;
        __builtin_memcpy(key.saddr, &ip6h->saddr, 16);
        __builtin_memcpy(key.daddr, &ip6h->daddr, 16);
    }

    struct flow_stats *st = flows.lookup(&key);
    if (!st) {
        struct flow_stats fresh = {
            .packets = 1, .candidates = cand, .bytes = len, .last_seen_ns = now,
        };
        /* NOEXIST: if another CPU created the flow meanwhile, add to its entry */
        if (flows.insert(&key, &fresh) == 0)
            goto counted;
        st = flows.lookup(&key);
    }
    if (st) {
        __sync_fetch_and_add(&st->packets, 1);
        __sync_fetch_and_add(&st->bytes, len);
        if (cand)
            __sync_fetch_and_add(&st->candidates, 1);
        if (now > st->last_seen_ns)
            st->last_seen_ns = now;
    }
counted:

    if (cand) {
        count(CNT_CANDIDATES);
        struct cand_event ev = {};
        ev.key = key;
        ev.ts_ns = now;
        ev.len = len;
        /* a full ring drops the record: counted here, where it happens, so
         * user space never has to infer the loss */
        if (events.ringbuf_output(&ev, sizeof(ev), 0) < 0)
            count(CNT_LOST);
    }
    return XDP_PASS;

out:
    if (l4 == PARSE_BAD)
        count(CNT_PARSE_ERRORS);
    return XDP_PASS;
}
