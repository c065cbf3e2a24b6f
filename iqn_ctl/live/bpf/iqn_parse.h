/* IQN's link-layer parse, shared by the data plane (iqn_xdp.c) and the boost
 * classifier (iqn_boost.c), so both read the same frames the same way:
 * Ethernet, up to two VLAN tags (802.1Q / 802.1ad), a PPPoE session header,
 * or on a layer-3 device the IP header first.
 *
 * Parsing follows xdp-tutorial's parsing_helpers.h: a cursor walks the headers
 * and every helper checks its own bounds before reading, so the verifier can
 * prove every access and malformed frames simply stop the parse. Each helper
 * returns the ethertype the next header would have had on Ethernet (network
 * order), 0 for a frame that is not IP (ignored), or PARSE_BAD.
 *
 * The loaders compile the programs with bcc as text, so this file is found
 * through -I (iqn_ctl/live/bpfsrc.py: parser_cflags, which also sets IQN_L3
 * from the device type).
 */
#ifndef IQN_PARSE_H
#define IQN_PARSE_H

#include <linux/if_ether.h>

/* 1: the device is layer 3 (tun, WireGuard, PPP, GRE/IPIP: ARPHRD_NONE, _PPP,
 * _RAWIP, _TUNNEL...): its frames start at the IP header. 0: Ethernet. The
 * loader reads the device type and sets it; it chooses the first parser only. */
#ifndef IQN_L3
#define IQN_L3 0
#endif

#define IQN_ETH_P_8021Q 0x8100
#define IQN_ETH_P_8021AD 0x88A8
/* PPPoE session stage (RFC 2516) and the two PPP protocols it may carry */
#define IQN_ETH_P_PPP_SES 0x8864
#define IQN_PPP_IP 0x0021
#define IQN_PPP_IPV6 0x0057
#define IQN_VLAN_MAX_DEPTH 2

/* Outcome of a parse helper: PARSE_BAD means the frame is truncated or its
 * header is invalid (the data plane counts it as a parse error). */
#define PARSE_BAD (-1)

struct hdr_cursor {
    void *pos;
    /* when a PPPoE header said so (parse_pppoehdr), the IP packet's length and
     * its offset in the frame, else 0; iqn_xdp.c's iqn_band_len reads them */
    __u32 ip_len;
    __u32 ip_off;
};

/* A PPPoE session header (RFC 2516: version/type 0x11, code 0, session id,
 * payload length) and the 2-byte PPP protocol after it. Returns the ethertype
 * the inner packet would have had on Ethernet (IPv4 for 0x0021, IPv6 for
 * 0x0057), 0 for anything else (LCP, IPCP, ...: ignored, as a non-IP
 * ethertype is), or PARSE_BAD when the frame ends inside the 8 bytes. The
 * payload length minus the protocol's 2 bytes is the IP packet's length,
 * noted in the cursor for the size band (iqn_band_len). A compressed 1-byte
 * protocol field (PFC) is not read: PPPoE peers do not negotiate it in
 * practice (pppd and the kernel's pppoe do not). */
static __always_inline int parse_pppoehdr(struct hdr_cursor *nh, void *data_end)
{
    /* four 16-bit words: version/type + code, session id, length, PPP protocol */
    __be16 *w = nh->pos;
    if ((void *)(w + 4) > data_end)
        return PARSE_BAD;
    nh->pos = w + 4;
    if (w[0] != bpf_htons(0x1100))
        return 0;
    __u16 plen = bpf_ntohs(w[2]);
    if (plen < 2)
        return 0;
    nh->ip_len = plen - 2;
    if (w[3] == bpf_htons(IQN_PPP_IP))
        return bpf_htons(ETH_P_IP);
    if (w[3] == bpf_htons(IQN_PPP_IPV6))
        return bpf_htons(ETH_P_IPV6);
    return 0;
}

/* Ethernet plus up to two VLAN tags (802.1Q / 802.1ad), then a PPPoE session
 * header if the ethertype says so. Returns the inner ethertype in network
 * order, or PARSE_BAD when the frame is too short. */
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
    if (proto == bpf_htons(IQN_ETH_P_PPP_SES)) {
        int inner = parse_pppoehdr(nh, data_end);
        nh->ip_off = (__u32)(nh->pos - (void *)eth);
        return inner;
    }
    return proto;
}

/* A layer-3 device's frame: the IP header comes first and its version nibble
 * says which (as a raw-IP capture's link type does). Returns the ethertype an
 * Ethernet header would have carried, so the rest of the parse is shared. */
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
    return 0;  /* not IP: ignored, as a non-IP ethertype is */
}

/* the first parser of the device's frames (IQN_L3) */
#if IQN_L3
#define parse_first parse_l3start
#else
#define parse_first parse_ethhdr
#endif

#endif /* IQN_PARSE_H */
