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
 * The link layer is parsed by iqn_parse.h, the data plane's own parser
 * (xdp-tutorial's style: a header cursor, one bounds-checked helper per
 * header): Ethernet with up to two VLAN tags and a PPPoE session inside them
 * (a viewer behind a PPPoE access link is boosted too), or on a layer-3
 * device the IP header first. Compile-time constants (-D from
 * iqn_ctl.live.mitigate): IQN_BOOST_MAJOR (the HTB handle's major number),
 * IQN_BOOST_SLOTS (map size: the most clients boosted at once) and IQN_L3
 * (the device's frames start at the IP header); each has a default (IQN_L3's
 * in iqn_parse.h), so the file compiles on its own, given -I of this directory.
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>

#include "iqn_parse.h"

#ifndef IQN_BOOST_MAJOR
#define IQN_BOOST_MAJOR 0x4951
#endif
#ifndef IQN_BOOST_SLOTS
#define IQN_BOOST_SLOTS 64
#endif

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
