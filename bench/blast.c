/* Rate-controlled AF_PACKET sender for bench/bench_agent.py: sends prebuilt
 * Ethernet frames round-robin at a fixed packet rate with sendmmsg, so one
 * core can offer the agent several hundred thousand candidates per second
 * (pktgen is a kernel module CI's kernel does not ship).
 *
 * usage: blast IFACE RATE SECONDS FRAMEFILE
 *   FRAMEFILE: repeated [u16 little-endian length][frame bytes]
 * prints: sent=<packets> secs=<elapsed>
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAXF 4096
#define BATCH 32

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 5) { fprintf(stderr, "usage: blast IFACE RATE SECONDS FRAMEFILE\n"); return 2; }
    double rate = atof(argv[2]), secs = atof(argv[3]);
    FILE *f = fopen(argv[4], "rb");
    if (!f) { perror(argv[4]); return 2; }
    static unsigned char *frames[MAXF];
    static size_t lens[MAXF];
    int nf = 0;
    uint16_t len;
    while (nf < MAXF && fread(&len, 2, 1, f) == 1) {
        frames[nf] = malloc(len);
        if (fread(frames[nf], 1, len, f) != len) { fprintf(stderr, "short frame file\n"); return 2; }
        lens[nf++] = len;
    }
    fclose(f);
    if (!nf) { fprintf(stderr, "no frames\n"); return 2; }
    int s = socket(AF_PACKET, SOCK_RAW, 0);
    if (s < 0) { perror("socket"); return 2; }
    struct sockaddr_ll sll = {0};
    sll.sll_family = AF_PACKET;
    sll.sll_ifindex = if_nametoindex(argv[1]);
    if (!sll.sll_ifindex || bind(s, (struct sockaddr *)&sll, sizeof sll) < 0) { perror("bind"); return 2; }
    int one = 1;  /* skip the qdisc layer: the sender, not the agent, is the bottleneck otherwise */
    setsockopt(s, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof one);
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    long sent = 0, target_total = (long)(rate * secs);
    int next = 0;
    double t0 = now();
    while (sent < target_total) {
        double due = t0 + sent / rate;  /* when packet number `sent` is due */
        double t = now();
        if (t < due) {
            double d = due - t;
            if (d > 0.0002) { struct timespec ts = {0, (long)((d - 0.0001) * 1e9)}; nanosleep(&ts, NULL); }
            continue;
        }
        long owed = (long)((t - t0) * rate) - sent + 1;
        int b = owed < BATCH ? (int)owed : BATCH;
        if (b > target_total - sent) b = (int)(target_total - sent);
        for (int i = 0; i < b; i++) {
            iov[i].iov_base = frames[next];
            iov[i].iov_len = lens[next];
            memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            next = (next + 1) % nf;
        }
        int r = sendmmsg(s, msgs, b, 0);
        if (r < 0) { perror("sendmmsg"); return 1; }
        sent += r;
    }
    printf("sent=%ld secs=%.6f\n", sent, now() - t0);
    return 0;
}
