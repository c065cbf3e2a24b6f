/* IQN mitigation: put a stalling viewer's traffic into a priority class at
 * the router's congested egress (iqn-ctl attach --mitigate EGRESS).
 *
 * A TC (clsact) classifier at EGRESS's egress hook, run before the root
 * qdisc. The agent (iqn_ctl/live/mitigate.py) fills the `boosts` map with one
 * entry per boosted client address: the HTB class (IQN_BOOST_MAJOR:minor) of
 * the boost slot the planner (iqn_ctl/engine/boost.py) gave it. A packet to a
 * boosted client gets that class in skb->priority, which HTB reads before any
 * filter (htb_classify: a priority naming one of its leaf classes picks it);
 * everything else goes to the HTB's default class. The bytes and packets each
 * boost moved are counted in its map entry, read by the agent when it ends.
 *
 * A packet that arrives with a priority naming one of IQN's classes and is not
 * boosted (a local socket's SO_PRIORITY) has it cleared: only the agent grants
 * the priority class. The verdict is always TC_ACT_UNSPEC: nothing is dropped
 * and the classifiers after this one still run.
 *
 * Parsing follows xdp-tutorial's style (a header cursor, one bounds-checked
 * helper per header). Compile-time constants (-D from iqn_ctl.live.mitigate):
 * IQN_BOOST_MAJOR (the HTB handle's major number), IQN_BOOST_SLOTS (map size:
 * the most clients boosted at once) and IQN_L3 (the device's frames start at
 * the IP header); each has a default below, so the file compiles on its own.
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>

#ifndef IQN_BOOST_MAJOR
#define IQN_BOOST_MAJOR 0x4951
#endif
#ifndef IQN_BOOST_SLOTS
#define IQN_BOOST_SLOTS 64
#endif
#ifndef IQN_L3
#define IQN_L3 0
#endif

#define IQN_ETH_P_8021Q 0x8100
#define IQN_ETH_P_8021AD 0x88A8
#define IQN_VLAN_MAX_DEPTH 2
#define PARSE_BAD (-1)

/* A client address as the data plane's flow key holds it: 16 bytes in
 * network order, an IPv4 address in the first 4 and the rest zero. */
struct boost_key {
    __u8 addr[16];
    __u8 family;  /* 4 or 6 */
    __u8 pad[3];
};

struct boost_val {
    __u32 classid;  /* IQN_BOOST_MAJOR << 16 | minor */
    __u32 pad;
    __u64 bytes;    /* bytes given the class since the boost started */
    __u64 packets;
};

BPF_HASH(boosts, struct boost_key, struct boost_val, IQN_BOOST_SLOTS);

struct hdr_cursor {
    void *pos;
};

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
        __be16 *vlan = nh->pos;
        if ((void *)(vlan + 2) > data_end)
            return PARSE_BAD;
        proto = vlan[1];
        nh->pos = vlan + 2;
    }
    return proto;
}

static __always_inline int parse_l3start(struct hdr_cursor *nh, void *data_end)
{
    __u8 *first = nh->pos;
    if ((void *)(first + 1) > data_end)
        return PARSE_BAD;
    switch (*first >> 4) {
    case 4:
        return bpf_htons(ETH_P_IP);
    case 6:
        return bpf_htons(ETH_P_IPV6);
    }
    return 0;
}

#if IQN_L3
#define parse_first parse_l3start
#else
#define parse_first parse_ethhdr
#endif

/* The destination (the client) of an IPv4 packet into `key`. */
static __always_inline int parse_ip4_dst(struct hdr_cursor *nh, void *data_end, struct boost_key *key)
{
    struct iphdr *iph = nh->pos;
    if ((void *)(iph + 1) > data_end)
        return PARSE_BAD;
    __builtin_memcpy(key->addr, &iph->daddr, 4);
    key->family = 4;
    return 0;
}

static __always_inline int parse_ip6_dst(struct hdr_cursor *nh, void *data_end, struct boost_key *key)
{
    struct ipv6hdr *ip6h = nh->pos;
    if ((void *)(ip6h + 1) > data_end)
        return PARSE_BAD;
    __builtin_memcpy(key->addr, &ip6h->daddr, 16);
    key->family = 6;
    return 0;
}

static __always_inline int ours(__u32 prio)
{
    return (prio >> 16) == IQN_BOOST_MAJOR;
}

int iqn_boost(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct hdr_cursor nh = { .pos = data };
    struct boost_key key = {};
    int rc = PARSE_BAD;

    int eth_type = parse_first(&nh, data_end);
    if (eth_type == bpf_htons(ETH_P_IP))
        rc = parse_ip4_dst(&nh, data_end, &key);
    else if (eth_type == bpf_htons(ETH_P_IPV6))
        rc = parse_ip6_dst(&nh, data_end, &key);
    struct boost_val *v = rc == 0 ? boosts.lookup(&key) : NULL;
    if (v) {
        skb->priority = v->classid;
        __sync_fetch_and_add(&v->bytes, skb->len);
        __sync_fetch_and_add(&v->packets, 1);
    } else if (ours(skb->priority)) {
        skb->priority = 0;  /* the priority class is granted by the agent only */
    }
    return TC_ACT_UNSPEC;
}
