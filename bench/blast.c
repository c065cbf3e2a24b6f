/* Rate-controlled AF_PACKET sender for the live benchmarks: sends Ethernet
 * frames with sendmmsg, so one core can offer the agent several hundred
 * thousand packets per second (pktgen is a kernel module CI's kernel does not
 * ship). The many-flow mode can instead send through an XDP live-frames
 * generator (xdp_prog=, xdp_map=; bench/xdpgen.py), which builds no skb on the
 * sending side.
 *
 * Frame-file mode (bench/bench_agent.py, bench/bench_forward.py):
 *   blast IFACE RATE SECONDS FRAMEFILE
 *   FRAMEFILE: repeated [u16 little-endian length][frame bytes], sent round-robin
 *   RATE 0: as fast as the socket takes them, for SECONDS
 *   prints: sent=<packets> secs=<elapsed> cpu=<CPU seconds this process ran, softirqs it
 *           ran included: on veth the whole forwarding path runs in the sender's context>
 *           waits=<voluntary context switches> preempted=<involuntary ones>
 *
 * Many-flow mode (bench/bench_scale.py): M flows from one server (UDP source
 * port 443) to distinct client addresses and ports; S of them stall, each
 * stalling flow sending a burst of n candidate frames every p seconds while
 * its stall lasts, and every flow outside its stall sending "video" frames
 * (outside the candidate size band) at vpps packets/s:
 *   blast -m IFACE SECONDS key=value...
 *   keys: src_mac dst_mac (aa:bb:..), src (first server IPv4), servers=1 (flow i
 *         comes from server address src + i % servers), dst (first client IPv4),
 *         flows=M stall=S ports=K (client ports per address, from port 10000)
 *         n=4 p=0.2 gap_us=0 (within a burst) size=1250 (candidate frame bytes)
 *         vsize=1350 vpps=0 (video frames per second per flow)
 *         stall_at=0 spread=0 (stall i starts at stall_at + U(0, spread) s)
 *         stall_for=-1 (s; -1: until the end) seed=1 log=PATH
 *         wall=0 (1: stop after SECS of wall time even if behind schedule: to measure
 *         the most a sender offers)
 *         xdp_prog=FD xdp_map=FD: send with the XDP live-frames generator that
 *         bench/xdpgen.py loaded (inherited descriptors) instead of AF_PACKET: one
 *         BPF_PROG_TEST_RUN per batch of due frames, the frames going out through
 *         veth's ndo_xdp_xmit without skbs (the peer needs NAPI on: an XDP program)
 *         workers=16 (test runs in flight, one thread each: a run waits ~28 ms in the
 *         kernel, so one at a time offers only ~140k frames/s), xbatch=4096
 *         (frames per run at most), xbsz=64 (the kernel's batch inside a run)
 *   prints, xdp only: runs=<test runs> run_s=<wall time inside them, summed>
 *   flow i: client address dst + i / K, port 10000 + i % K; flows 0..S-1 stall.
 *   A burst is sent if it starts inside its flow's stall; each flow's bursts
 *   start at a random phase in [0, p).
 *   prints: sent=<packets> candidates=<n> bursts=<n> video=<n> secs=<elapsed>
 *           late_max_ms=<worst lateness of a packet against its schedule>
 *   log (optional): one line per stalling flow that sent a burst:
 *     flow first nth last bursts   (CLOCK_REALTIME s: first candidate of the
 *     stall, n-th candidate of its first burst, last candidate of the stall)
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
#include <math.h>
#include <time.h>
#include <sys/resource.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <pthread.h>
#include <linux/bpf.h>
#include <unistd.h>

#define MAXF 4096
#define BATCH 32

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int frame_mode(int argc, char **argv) {
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
    struct timespec cpu0, cpu;  /* this process's CPU time: the send and, on veth, the receive path it runs */
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cpu0);
    double t0 = now();
    int unlimited = rate <= 0;
    if (unlimited) target_total = -1;
    while (unlimited || sent < target_total) {
        double t = now();
        if (unlimited) {
            if (t - t0 >= secs) break;
            rate = 1e12;  /* every packet is due */
        }
        double due = t0 + sent / rate;  /* when packet number `sent` is due */
        if (t < due) {
            double d = due - t;
            if (d > 0.0002) { struct timespec ts = {0, (long)((d - 0.0001) * 1e9)}; nanosleep(&ts, NULL); }
            continue;
        }
        long owed = (long)((t - t0) * rate) - sent + 1;
        int b = owed < BATCH ? (int)owed : BATCH;
        if (!unlimited && b > target_total - sent) b = (int)(target_total - sent);
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
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cpu);
    struct rusage ru;  /* waits (a full socket send buffer) and preemptions, since the start */
    getrusage(RUSAGE_SELF, &ru);
    printf("sent=%ld secs=%.6f cpu=%.6f waits=%ld preempted=%ld\n", sent, now() - t0,
           (cpu.tv_sec - cpu0.tv_sec) + (cpu.tv_nsec - cpu0.tv_nsec) / 1e9, ru.ru_nvcsw, ru.ru_nivcsw);
    return 0;
}

/* ---- many-flow mode ------------------------------------------------------ */

struct flow {
    double phase;        /* burst phase in [0, p) */
    double vphase;       /* video phase in [0, 1/vpps) */
    double s, e;         /* stall window [s, e) (relative seconds); s = e = INF: never stalls */
    double first, nth, last;
    long bursts;
};

struct cursor {          /* walks flows in phase order, period after period */
    int *order;          /* flow indices sorted by phase */
    int count, idx;
    long k;              /* period number */
    double period, off;  /* off: j * gap for burst packet j */
    int j;               /* -1: video */
    double next;         /* time of the current item */
};

static struct flow *F;
static double P, GAP, VP, SECS;
static int N;

static double item_time(struct cursor *c) {
    int f = c->order[c->idx];
    double ph = c->j < 0 ? F[f].vphase : F[f].phase;
    return c->k * c->period + ph + c->off;
}

static void cur_advance(struct cursor *c) {
    if (++c->idx == c->count) { c->idx = 0; c->k++; }
    c->next = item_time(c);
}

static int by_phase(const void *a, const void *b) {
    double x = F[*(const int *)a].phase, y = F[*(const int *)b].phase;
    return (x > y) - (x < y);
}
static int by_vphase(const void *a, const void *b) {
    double x = F[*(const int *)a].vphase, y = F[*(const int *)b].vphase;
    return (x > y) - (x < y);
}

static int parse_mac(const char *s, unsigned char *m) {
    return sscanf(s, "%hhx:%hhx:%hhx:%hhx:%hhx:%hhx", &m[0], &m[1], &m[2], &m[3], &m[4], &m[5]) == 6;
}

static uint64_t rng_state;
static double urand(void) {  /* xorshift64*, [0, 1) */
    rng_state ^= rng_state >> 12; rng_state ^= rng_state << 25; rng_state ^= rng_state >> 27;
    return (double)((rng_state * 2685821657736338717ULL) >> 11) / 9007199254740992.0;
}

#define HDR 42  /* Ethernet + IPv4 + UDP */
#define MBATCH 64

/* ---- XDP live-frames sender (bench/xdpgen.py loads the program) ---------- */
#define XBATCH 4096   /* frames per test run at most: bench/xdpgen.py SLOTS */
#define XWORKERS 16   /* test runs in flight at most: bench/xdpgen.py WORKERS */
struct xdesc { uint16_t len; unsigned char hdr[HDR]; unsigned char pad[4]; uint64_t sent_ns; };
struct xbatch { uint32_t next, ifindex; struct xdesc d[XBATCH]; };

/* Each test run costs a fixed ~28 ms of wall time in the kernel (measured on 6.18: 27.5 ms
 * per run for 64 frames or 4,096; the caller sleeps, it is not CPU), and a variant that let
 * a run start only once the previous run's frames were all taken fell back to one run per
 * ~28 ms, so the wait comes before a run's frames go out. Where it is: any XDP test run with
 * repeat > 1 installs the program in the kernel's XDP dispatcher before it runs and removes
 * it after (bpf_prog_change_xdp in net/bpf/test_run.c), and each dispatcher change waits
 * for an RCU grace period. A bare C loop on an empty XDP program (2026-12-03, idle box):
 * repeat=1 1.07 us a call, repeat=2 and repeat=1000 17.5 ms a call; a live-frames run
 * needs repeat = its frame count. So runs go to worker threads, each with its own
 * batch (map entry = worker number, which the generator reads from the first payload
 * byte of its template frame), and the scheduler fills the next idle worker's batch while
 * others wait. Runs may overtake each other; the generator stamps each frame's send time,
 * which the log uses. */
struct xworker {
    pthread_t th;
    int id, prog, tlen, b, busy, err;
    int flow[XBATCH];              /* the flow of frame i */
    unsigned char role[XBATCH];    /* frame i is its flow's 1: first, 2: n-th, 4: latest candidate */
    struct xbatch *x;
    unsigned char tmpl[1514];
    pthread_mutex_t mu;
    pthread_cond_t cv;
};
static struct xworker XW[XWORKERS];
static int xnw, xstop;
static pthread_mutex_t xmu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t xidle = PTHREAD_COND_INITIALIZER;
static int xbsz = 64;   /* frames per kernel batch inside a test run (xbsz=) */
static double xt0, xrt0;  /* the run's start: CLOCK_MONOTONIC and CLOCK_REALTIME */
static long xcalls;
static double xcall_s;  /* wall time inside the test runs, summed over workers */

static void *xworker_main(void *arg) {
    struct xworker *w = arg;
    for (;;) {
        pthread_mutex_lock(&xmu);
        while (!w->busy && !xstop) pthread_cond_wait(&w->cv, &xmu);
        if (!w->busy && xstop) { pthread_mutex_unlock(&xmu); return NULL; }
        int b = w->b;
        pthread_mutex_unlock(&xmu);
        w->x->next = 0;
        union bpf_attr a;
        memset(&a, 0, sizeof a);
        a.test.prog_fd = w->prog;
        a.test.data_in = (uint64_t)(uintptr_t)w->tmpl;
        a.test.data_size_in = w->tlen;
        a.test.repeat = b;
        a.test.flags = BPF_F_TEST_XDP_LIVE_FRAMES;
        a.test.batch_size = b < xbsz ? b : xbsz;
        double c0 = now();
        int err = 0;
        if (syscall(__NR_bpf, BPF_PROG_TEST_RUN, &a, sizeof a) < 0) { perror("bpf(BPF_PROG_TEST_RUN)"); err = 1; }
        else if (w->x->next != (uint32_t)b) {
            fprintf(stderr, "blast: the generator ran %u times for %d frames\n", w->x->next, b); err = 1;
        }
        pthread_mutex_lock(&xmu);
        /* the log's send times are the generator's (CLOCK_MONOTONIC, as now()): a run's
         * frames go out some ms after it is posted, later still when runs queue for the CPU */
        for (int i = 0; !err && i < b; i++) {
            if (!w->role[i]) continue;
            struct flow *fl = &F[w->flow[i]];
            double ts = xrt0 + (w->x->d[i].sent_ns / 1e9 - xt0);
            if (w->role[i] & 1) fl->first = ts;
            if (w->role[i] & 2) fl->nth = ts;
            if ((w->role[i] & 4) && ts > fl->last) fl->last = ts;
        }
        xcalls++;
        xcall_s += now() - c0;
        w->err |= err;
        w->busy = 0;
        pthread_cond_broadcast(&xidle);
        pthread_mutex_unlock(&xmu);
    }
}

/* An idle worker (waiting for one if all are busy); -1 if one failed. */
static int xacquire(void) {
    pthread_mutex_lock(&xmu);
    for (;;) {
        for (int i = 0; i < xnw; i++) {
            if (XW[i].err) { pthread_mutex_unlock(&xmu); return -1; }
        }
        for (int i = 0; i < xnw; i++) {
            if (!XW[i].busy) { pthread_mutex_unlock(&xmu); return i; }
        }
        pthread_cond_wait(&xidle, &xmu);
    }
}

static void xpost(int i, int b) {
    pthread_mutex_lock(&xmu);
    XW[i].b = b;
    XW[i].busy = 1;
    pthread_cond_signal(&XW[i].cv);
    pthread_mutex_unlock(&xmu);
}

/* Wait for every run to finish and stop the workers; nonzero if one failed. */
static int xfinish(void) {
    int err = 0;
    pthread_mutex_lock(&xmu);
    for (;;) {
        int busy = 0;
        for (int i = 0; i < xnw; i++) busy |= XW[i].busy;
        if (!busy) break;
        pthread_cond_wait(&xidle, &xmu);
    }
    xstop = 1;
    for (int i = 0; i < xnw; i++) { err |= XW[i].err; pthread_cond_signal(&XW[i].cv); }
    pthread_mutex_unlock(&xmu);
    for (int i = 0; i < xnw; i++) pthread_join(XW[i].th, NULL);
    return err;
}

static void build_hdr(unsigned char *h, const unsigned char *smac, const unsigned char *dmac,
                      uint32_t src, uint32_t dst, uint16_t dport, int frame_len) {
    memcpy(h, dmac, 6); memcpy(h + 6, smac, 6);
    h[12] = 0x08; h[13] = 0x00;
    unsigned char *ip = h + 14;
    int ip_len = frame_len - 14;
    ip[0] = 0x45; ip[1] = 0; ip[2] = ip_len >> 8; ip[3] = ip_len & 0xff;
    ip[4] = ip[5] = 0; ip[6] = 0x40; ip[7] = 0;  /* DF */
    ip[8] = 64; ip[9] = 17; ip[10] = ip[11] = 0;
    memcpy(ip + 12, &src, 4); memcpy(ip + 16, &dst, 4);
    uint32_t sum = 0;
    for (int i = 0; i < 20; i += 2) sum += (ip[i] << 8) | ip[i + 1];
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    sum = ~sum & 0xffff;
    ip[10] = sum >> 8; ip[11] = sum & 0xff;
    unsigned char *udp = ip + 20;
    int ulen = ip_len - 20;
    udp[0] = 443 >> 8; udp[1] = 443 & 0xff; udp[2] = dport >> 8; udp[3] = dport & 0xff;
    udp[4] = ulen >> 8; udp[5] = ulen & 0xff; udp[6] = udp[7] = 0;  /* no UDP checksum (IPv4) */
}

static int many_mode(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: blast -m IFACE SECONDS key=value...\n"); return 2; }
    const char *iface = argv[2];
    SECS = atof(argv[3]);
    unsigned char smac[6] = {2, 0, 0, 0, 0, 1}, dmac[6] = {2, 0, 0, 0, 0, 2};
    struct in_addr src = {0}, dst = {0};
    int M = 1000, S = -1, K = 50000, size = 1250, vsize = 1350, servers = 1;
    double vpps = 0, stall_at = 0, spread = 0, stall_for = -1;
    const char *logpath = NULL;
    int xprog = -1, xmap = -1, wall = 0, xbatch = XBATCH, workers = XWORKERS;  /* wall=1: stop at SECS of wall time, sent or not */  /* xdp_prog=FD xdp_map=FD: send with the live-frames generator */
    N = 4; P = 0.2; GAP = 0;
    rng_state = 1;
    inet_pton(AF_INET, "198.18.0.1", &src);
    inet_pton(AF_INET, "198.19.0.0", &dst);
    for (int a = 4; a < argc; a++) {
        char *eq = strchr(argv[a], '=');
        if (!eq) { fprintf(stderr, "blast: expected key=value, got %s\n", argv[a]); return 2; }
        *eq = 0;
        const char *k = argv[a], *v = eq + 1;
        int ok = 1;
        if (!strcmp(k, "src_mac")) ok = parse_mac(v, smac);
        else if (!strcmp(k, "dst_mac")) ok = parse_mac(v, dmac);
        else if (!strcmp(k, "src")) ok = inet_pton(AF_INET, v, &src) == 1;
        else if (!strcmp(k, "dst")) ok = inet_pton(AF_INET, v, &dst) == 1;
        else if (!strcmp(k, "flows")) M = atoi(v);
        else if (!strcmp(k, "servers")) servers = atoi(v);
        else if (!strcmp(k, "stall")) S = atoi(v);
        else if (!strcmp(k, "ports")) K = atoi(v);
        else if (!strcmp(k, "n")) N = atoi(v);
        else if (!strcmp(k, "p")) P = atof(v);
        else if (!strcmp(k, "gap_us")) GAP = atof(v) / 1e6;
        else if (!strcmp(k, "size")) size = atoi(v);
        else if (!strcmp(k, "vsize")) vsize = atoi(v);
        else if (!strcmp(k, "vpps")) vpps = atof(v);
        else if (!strcmp(k, "stall_at")) stall_at = atof(v);
        else if (!strcmp(k, "spread")) spread = atof(v);
        else if (!strcmp(k, "stall_for")) stall_for = atof(v);
        else if (!strcmp(k, "seed")) rng_state = strtoull(v, NULL, 10) * 0x9E3779B97F4A7C15ULL + 1;
        else if (!strcmp(k, "log")) logpath = v;
        else if (!strcmp(k, "xdp_prog")) xprog = atoi(v);
        else if (!strcmp(k, "xdp_map")) xmap = atoi(v);
        else if (!strcmp(k, "wall")) wall = atoi(v);
        else if (!strcmp(k, "xbatch")) xbatch = atoi(v);
        else if (!strcmp(k, "xbsz")) xbsz = atoi(v);
        else if (!strcmp(k, "workers")) workers = atoi(v);
        else { fprintf(stderr, "blast: unknown key %s\n", k); return 2; }
        if (!ok) { fprintf(stderr, "blast: bad value for %s: %s\n", k, v); return 2; }
    }
    if (S < 0) S = M;
    if (M < 1 || S > M || servers < 1 || K < 1 || K > 55535 || N < 1 || P <= 0 || size < 60 || size > 1514 ||
        vsize < 60 || vsize > 1514 || vpps < 0 || SECS <= 0) {
        fprintf(stderr, "blast: bad parameters\n"); return 2;
    }
    F = calloc(M, sizeof *F);
    for (int i = 0; i < M; i++) {
        F[i].phase = urand() * P;
        F[i].vphase = vpps > 0 ? urand() / vpps : 0;
        if (i < S) {
            F[i].s = stall_at + urand() * spread;
            F[i].e = stall_for < 0 ? INFINITY : F[i].s + stall_for;
        } else {
            F[i].s = F[i].e = INFINITY;
        }
        F[i].first = F[i].nth = F[i].last = 0;
    }
    VP = vpps > 0 ? 1.0 / vpps : 0;
    int nc = (S > 0 ? N : 0) + (vpps > 0 ? 1 : 0);
    struct cursor cur[nc > 0 ? nc : 1];
    int *border = malloc(sizeof(int) * (S > 0 ? S : 1)), *vorder = malloc(sizeof(int) * M);
    for (int i = 0; i < S; i++) border[i] = i;
    for (int i = 0; i < M; i++) vorder[i] = i;
    qsort(border, S, sizeof(int), by_phase);
    qsort(vorder, M, sizeof(int), by_vphase);
    int c = 0;
    for (int j = 0; S > 0 && j < N; j++, c++)
        cur[c] = (struct cursor){border, S, 0, 0, P, j * GAP, j, 0};
    if (vpps > 0) cur[c++] = (struct cursor){vorder, M, 0, 0, VP, 0, -1, 0};
    for (int i = 0; i < nc; i++) cur[i].next = item_time(&cur[i]);

    int xdp = xprog >= 0 || xmap >= 0, s = -1, maxb = MBATCH;
    struct xbatch *xb = NULL;
    static unsigned char tmpl[1514];  /* the live-frames template: every frame starts as this */
    int tlen = size > vsize ? size : vsize;
    if (xdp) {
        if (xprog < 0 || xmap < 0) { fprintf(stderr, "blast: xdp_prog and xdp_map go together\n"); return 2; }
        if (workers < 1 || workers > XWORKERS) { fprintf(stderr, "blast: workers=1..%d\n", XWORKERS); return 2; }
        long pg = sysconf(_SC_PAGESIZE);
        struct xbatch *all = mmap(NULL, (XWORKERS * sizeof *xb + pg - 1) / pg * pg, PROT_READ | PROT_WRITE,
                                  MAP_SHARED, xmap, 0);
        if (all == MAP_FAILED) { perror("mmap xdp_map"); return 2; }
        uint32_t ifx = if_nametoindex(iface);
        if (!ifx) { perror(iface); return 2; }
        build_hdr(tmpl, smac, dmac, src.s_addr, dst.s_addr, 10000, tlen);
        xnw = workers;
        for (int i = 0; i < xnw; i++) {
            struct xworker *w = &XW[i];
            w->id = i; w->prog = xprog; w->tlen = tlen; w->x = &all[i];
            w->x->ifindex = ifx;
            memcpy(w->tmpl, tmpl, tlen);
            w->tmpl[HDR] = (unsigned char)i;  /* which map entry the generator reads */
            pthread_cond_init(&w->cv, NULL);
            if (pthread_create(&w->th, NULL, xworker_main, w)) { perror("pthread_create"); return 2; }
        }
        maxb = xbatch > 0 && xbatch < XBATCH ? xbatch : XBATCH;
    } else {
        s = socket(AF_PACKET, SOCK_RAW, 0);
        if (s < 0) { perror("socket"); return 2; }
        struct sockaddr_ll sll = {0};
        sll.sll_family = AF_PACKET;
        sll.sll_ifindex = if_nametoindex(iface);
        if (!sll.sll_ifindex || bind(s, (struct sockaddr *)&sll, sizeof sll) < 0) { perror("bind"); return 2; }
        int one = 1;
        setsockopt(s, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof one);
    }

    static unsigned char payload[1514];
    static unsigned char hdrs[MBATCH][HDR];
    struct mmsghdr msgs[MBATCH];
    struct iovec iov[MBATCH][2];
    uint32_t dbase = ntohl(dst.s_addr), sbase = ntohl(src.s_addr);
    long sent = 0, cands = 0, bursts = 0, video = 0;
    double late_max = 0;
    struct timespec rt;
    clock_gettime(CLOCK_REALTIME, &rt);
    double t0 = now(), rt0 = rt.tv_sec + rt.tv_nsec / 1e9;
    xt0 = t0; xrt0 = rt0;
    int done = 0;
    int xw = -1;  /* the worker whose batch is being filled */
    while (!done) {
        if (xdp && xw < 0) {
            xw = xacquire();
            if (xw < 0) return 1;
            xb = XW[xw].x;
        }
        double t = now() - t0;
        if (wall && t >= SECS) break;
        int b = 0;
        double soonest = INFINITY;
        while (b < maxb) {
            int mi = -1;
            double mt = INFINITY;
            for (int i = 0; i < nc; i++)
                if (cur[i].next < mt) { mt = cur[i].next; mi = i; }
            if (mi < 0 || mt >= SECS) { if (b == 0) done = 1; break; }
            if (mt > t) { soonest = mt; break; }
            struct cursor *cu = &cur[mi];
            int f = cu->order[cu->idx];
            int len;
            if (cu->j >= 0) {  /* burst packet j of the burst that starts at mt - j * gap */
                double tb = mt - cu->off;
                if (tb < F[f].s || tb >= F[f].e) { cur_advance(cu); continue; }
                len = size;
                int role = 4;
                if (cu->j == 0) {
                    if (!F[f].bursts) { F[f].first = rt0 + t; role |= 1; }
                    F[f].bursts++;
                    bursts++;
                }
                if (cu->j == N - 1 && F[f].bursts == 1) { F[f].nth = rt0 + t; role |= 2; }
                F[f].last = rt0 + t;
                cands++;
                if (xdp) { XW[xw].flow[b] = f; XW[xw].role[b] = (unsigned char)role; }
            } else {
                if (mt >= F[f].s && mt < F[f].e) { cur_advance(cu); continue; }
                len = vsize;
                video++;
                if (xdp) XW[xw].role[b] = 0;
            }
            if (t - mt > late_max) late_max = t - mt;
            if (xdp) {
                build_hdr(xb->d[b].hdr, smac, dmac, htonl(sbase + (uint32_t)(f % servers)),
                          htonl(dbase + (uint32_t)(f / K)), (uint16_t)(10000 + f % K), len);
                xb->d[b].len = (uint16_t)len;
                b++;
                cur_advance(cu);
                continue;
            }
            build_hdr(hdrs[b], smac, dmac, htonl(sbase + (uint32_t)(f % servers)), htonl(dbase + (uint32_t)(f / K)),
                      (uint16_t)(10000 + f % K), len);
            iov[b][0].iov_base = hdrs[b]; iov[b][0].iov_len = HDR;
            iov[b][1].iov_base = payload; iov[b][1].iov_len = len - HDR;
            memset(&msgs[b].msg_hdr, 0, sizeof msgs[b].msg_hdr);
            msgs[b].msg_hdr.msg_iov = iov[b];
            msgs[b].msg_hdr.msg_iovlen = 2;
            b++;
            cur_advance(cu);
        }
        if (b == 0) {
            if (done) break;
            double d = soonest - (now() - t0);
            if (d > 0.0002) { struct timespec ts = {0, (long)((d - 0.0001) * 1e9)}; nanosleep(&ts, NULL); }
            continue;
        }
        if (xdp) {
            xpost(xw, b);
            xw = -1;
            sent += b;
            continue;
        }
        int off = 0;
        while (off < b) {
            int r = sendmmsg(s, msgs + off, b - off, 0);
            if (r < 0) { perror("sendmmsg"); return 1; }
            off += r;
        }
        sent += b;
    }
    if (xdp && xfinish()) return 1;
    printf("sent=%ld candidates=%ld bursts=%ld video=%ld secs=%.6f late_max_ms=%.3f",
           sent, cands, bursts, video, now() - t0, late_max * 1e3);
    if (xdp) printf(" runs=%ld run_s=%.6f", xcalls, xcall_s);  /* test runs, wall time inside them */
    printf("\n");
    if (logpath) {
        FILE *lf = fopen(logpath, "w");
        if (!lf) { perror(logpath); return 1; }
        for (int i = 0; i < S; i++)
            if (F[i].bursts)
                fprintf(lf, "%d %.6f %.6f %.6f %ld\n", i, F[i].first, F[i].nth, F[i].last, F[i].bursts);
        fclose(lf);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "-m")) return many_mode(argc, argv);
    return frame_mode(argc, argv);
}
