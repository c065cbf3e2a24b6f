/* IQN lab: hand every IP packet leaving an interface to the lab's delay line.
 *
 * The kernel here has neither netem nor fq (so no earliest-departure-time
 * qdisc honours skb->tstamp): the delay is applied in user space
 * (iqn_lab/jitter.py). This TC egress classifier redirects each IPv4/IPv6
 * frame to the delay line's tap device; the delay line holds it for its drawn
 * delay and sends it on the interface with PACKET_QDISC_BYPASS, which skips
 * this hook, so nothing loops. ARP and neighbour discovery go out at once.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/pkt_cls.h>

#ifndef IQN_TAP_IFINDEX
#define IQN_TAP_IFINDEX 0
#endif

int iqn_jitter(struct __sk_buff *skb)
{
    if (skb->protocol != bpf_htons(ETH_P_IP) && skb->protocol != bpf_htons(ETH_P_IPV6))
        return TC_ACT_OK;
    return bpf_redirect(IQN_TAP_IFINDEX, 0);
}
