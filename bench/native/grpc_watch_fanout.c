/* grpc_watch_fanout: K gRPC server-streaming calls, one TCP connection each, that stamp every message's arrival.
 *
 * The jobs benchmark's native watcher. A Python grpc.aio client spends ~60-100 us of CPU per message received;
 * with 100 watchers in one process on the benchmark's 2 shared cores, the watchers' own CPU delays the service
 * they are timing. This client costs a few us per message (HTTP/2 by libnghttp2, one epoll loop), so a figure
 * taken with it is mostly the server's. It does not parse protobuf: it keeps each message's bytes and its
 * arrival time, and the benchmark decodes them afterwards.
 *
 *   grpc_watch_fanout HOST PORT METHOD_PATH TIMEOUT_S < streams
 *
 * stdin: one line per stream, "ID HEX" (ID an integer, HEX the serialized request message); end of input
 * starts the calls.
 * stdout, while running: "attached USAGE" once every stream has its first message (or has ended).
 * stdout, when every stream has ended (or TIMEOUT_S passed): "ended USAGE" (before anything is printed, so the
 * dump is not in it), then per stream "S ID STATUS MESSAGE_COUNT GRPC_MESSAGE" (STATUS is grpc-status, -1 if the
 * stream ended without one; GRPC_MESSAGE percent-encoded as sent), then per message "M ID SECONDS HEX", SECONDS
 * the CLOCK_REALTIME time (as Python's time.time()) right after the read that completed the message (a message
 * waiting in its socket while the loop serves other streams is stamped when read, as a client would see it);
 * then "end". USAGE is this process's CPU seconds so far, user and system, then its (only) thread's seconds on a
 * CPU and runnable but waiting for one (/proc/self/schedstat).
 * Exit code 0 if every stream ended with grpc-status 0, 1 otherwise, 2 on bad usage or a connection failure.
 *
 * Build: cc -O2 -o grpc_watch_fanout grpc_watch_fanout.c -lnghttp2 (Debian: libnghttp2-dev).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    double t;        /* arrival, seconds since the epoch */
    size_t offset;   /* into the stream's message bytes */
    size_t length;
} Message;

typedef struct {
    long id;
    int fd;
    nghttp2_session *session;
    int32_t stream_id;
    uint8_t *request;  /* gRPC frame: 5-byte prefix + message */
    size_t request_len, request_sent;
    uint8_t *pending;  /* DATA bytes not yet a whole message */
    size_t pending_len, pending_cap;
    uint8_t *bytes;    /* every whole message, back to back */
    size_t bytes_len, bytes_cap;
    Message *messages;
    size_t count, cap;
    int status;        /* grpc-status from the trailers, -1 until then */
    char grpc_message[256];
    int closed;
    double now;        /* arrival time of the bytes being handed to nghttp2 */
} Stream;

static double wall_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void print_usage(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    unsigned long long run_ns = 0, wait_ns = 0;
    FILE *f = fopen("/proc/self/schedstat", "r");
    if (f) {
        if (fscanf(f, "%llu %llu", &run_ns, &wait_ns) != 2) run_ns = wait_ns = 0;
        fclose(f);
    }
    printf(" %.6f %.6f %.9f %.9f\n", ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6,
           ru.ru_stime.tv_sec + ru.ru_stime.tv_usec * 1e-6, run_ns * 1e-9, wait_ns * 1e-9);
}

static void *grow(void *p, size_t *cap, size_t need, size_t item) {
    if (need <= *cap) return p;
    size_t n = *cap ? *cap : 64;
    while (n < need) n *= 2;
    void *q = realloc(p, n * item);
    if (!q) { perror("realloc"); exit(2); }
    *cap = n;
    return q;
}

static void die(const char *what) { fprintf(stderr, "grpc_watch_fanout: %s\n", what); exit(2); }

static ssize_t on_send(nghttp2_session *session, const uint8_t *data, size_t length, int flags, void *user) {
    (void)session; (void)flags;
    Stream *s = user;
    ssize_t n = send(s->fd, data, length, MSG_NOSIGNAL);
    if (n < 0) return (errno == EAGAIN || errno == EWOULDBLOCK) ? NGHTTP2_ERR_WOULDBLOCK : NGHTTP2_ERR_CALLBACK_FAILURE;
    return n;
}

static ssize_t read_request(nghttp2_session *session, int32_t stream_id, uint8_t *buf, size_t length,
                            uint32_t *flags, nghttp2_data_source *source, void *user) {
    (void)session; (void)stream_id; (void)source;
    Stream *s = user;
    size_t n = s->request_len - s->request_sent;
    if (n > length) n = length;
    memcpy(buf, s->request + s->request_sent, n);
    s->request_sent += n;
    if (s->request_sent == s->request_len) *flags |= NGHTTP2_DATA_FLAG_EOF;
    return (ssize_t)n;
}

static int on_data(nghttp2_session *session, uint8_t flags, int32_t stream_id, const uint8_t *data, size_t len,
                   void *user) {
    (void)session; (void)flags; (void)stream_id;
    Stream *s = user;
    if (len == 0) return 0;
    s->pending = grow(s->pending, &s->pending_cap, s->pending_len + len, 1);
    memcpy(s->pending + s->pending_len, data, len);
    s->pending_len += len;
    size_t at = 0;
    while (s->pending_len - at >= 5) {
        const uint8_t *p = s->pending + at;
        size_t mlen = ((size_t)p[1] << 24) | ((size_t)p[2] << 16) | ((size_t)p[3] << 8) | p[4];
        if (s->pending_len - at < 5 + mlen) break;
        s->bytes = grow(s->bytes, &s->bytes_cap, s->bytes_len + mlen + 1, 1);
        if (mlen) memcpy(s->bytes + s->bytes_len, p + 5, mlen);
        s->messages = grow(s->messages, &s->cap, s->count + 1, sizeof(Message));
        s->messages[s->count++] = (Message){s->now, s->bytes_len, mlen};
        s->bytes_len += mlen;
        at += 5 + mlen;
    }
    memmove(s->pending, s->pending + at, s->pending_len - at);
    s->pending_len -= at;
    return 0;
}

static int on_header(nghttp2_session *session, const nghttp2_frame *frame, const uint8_t *name, size_t namelen,
                     const uint8_t *value, size_t valuelen, uint8_t flags, void *user) {
    (void)session; (void)frame; (void)flags;
    Stream *s = user;
    if (namelen == 11 && memcmp(name, "grpc-status", 11) == 0) {
        char v[16] = {0};
        memcpy(v, value, valuelen < 15 ? valuelen : 15);
        s->status = atoi(v);
    } else if (namelen == 12 && memcmp(name, "grpc-message", 12) == 0) {
        size_t n = valuelen < sizeof s->grpc_message - 1 ? valuelen : sizeof s->grpc_message - 1;
        memcpy(s->grpc_message, value, n);
        s->grpc_message[n] = 0;
        for (size_t i = 0; i < n; i++) if (s->grpc_message[i] == '\n') s->grpc_message[i] = ' ';
    }
    return 0;
}

static int on_close(nghttp2_session *session, int32_t stream_id, uint32_t error_code, void *user) {
    (void)session; (void)stream_id; (void)error_code;
    ((Stream *)user)->closed = 1;
    return 0;
}

static int connect_to(const char *host, const char *port) {
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res;
    if (getaddrinfo(host, port, &hints, &res) != 0) die("cannot resolve the address");
    int fd = socket(res->ai_family, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, res->ai_addr, res->ai_addrlen) != 0) die("cannot connect");
    freeaddrinfo(res);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

static void start_call(Stream *s, const char *host, const char *port, const char *path, nghttp2_session_callbacks *cb) {
    s->fd = connect_to(host, port);
    s->status = -1;
    if (nghttp2_session_client_new(&s->session, cb, s) != 0) die("nghttp2_session_client_new");
    nghttp2_settings_entry settings[] = {{NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, 100},
                                         {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20}};
    nghttp2_submit_settings(s->session, NGHTTP2_FLAG_NONE, settings, 2);
    char authority[300];
    snprintf(authority, sizeof authority, "%s:%s", host, port);
#define NV(n, v) {(uint8_t *)(n), (uint8_t *)(v), strlen(n), strlen(v), NGHTTP2_NV_FLAG_NONE}
    nghttp2_nv headers[] = {NV(":method", "POST"), NV(":scheme", "http"), NV(":path", path),
                            NV(":authority", authority), NV("content-type", "application/grpc"), NV("te", "trailers"),
                            NV("user-agent", "framewise-bench-native-watcher/1")};
#undef NV
    nghttp2_data_provider body = {.read_callback = read_request};
    s->stream_id = nghttp2_submit_request(s->session, NULL, headers, sizeof headers / sizeof *headers, &body, s);
    if (s->stream_id < 0) die("nghttp2_submit_request");
    if (nghttp2_session_send(s->session) != 0) die("nghttp2_session_send");
}

static int hexval(int c) { return c <= '9' ? c - '0' : (c | 32) - 'a' + 10; }

int main(int argc, char **argv) {
    if (argc != 5) die("usage: grpc_watch_fanout HOST PORT METHOD_PATH TIMEOUT_S < streams");
    const char *host = argv[1], *port = argv[2], *path = argv[3];
    double deadline = wall_now() + atof(argv[4]);
    Stream *streams = NULL;
    size_t n = 0, cap = 0;
    char *line = NULL;
    size_t line_cap = 0;
    while (getline(&line, &line_cap, stdin) > 0) {
        char *hex = strchr(line, ' ');
        if (!hex) continue;
        *hex++ = 0;
        size_t hlen = strcspn(hex, "\r\n");
        streams = grow(streams, &cap, n + 1, sizeof(Stream));
        Stream *s = &streams[n++];
        memset(s, 0, sizeof *s);
        s->id = atol(line);
        s->request_len = 5 + hlen / 2;
        s->request = calloc(1, s->request_len);
        s->request[1] = (uint8_t)(hlen / 2 >> 24); s->request[2] = (uint8_t)(hlen / 2 >> 16);
        s->request[3] = (uint8_t)(hlen / 2 >> 8); s->request[4] = (uint8_t)(hlen / 2);
        for (size_t i = 0; i < hlen / 2; i++) s->request[5 + i] = (uint8_t)(hexval(hex[2 * i]) << 4 | hexval(hex[2 * i + 1]));
    }
    if (n == 0) die("no streams on stdin");

    nghttp2_session_callbacks *cb;
    nghttp2_session_callbacks_new(&cb);
    nghttp2_session_callbacks_set_send_callback(cb, on_send);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, on_data);
    nghttp2_session_callbacks_set_on_header_callback(cb, on_header);
    nghttp2_session_callbacks_set_on_stream_close_callback(cb, on_close);
    int ep = epoll_create1(0);
    for (size_t i = 0; i < n; i++) {
        start_call(&streams[i], host, port, path, cb);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &streams[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, streams[i].fd, &ev);
    }

    size_t open_streams = n;
    int attached = 0;
    uint8_t buf[65536];
    struct epoll_event events[256];
    while (open_streams > 0 && wall_now() < deadline) {
        int ready = epoll_wait(ep, events, 256, 200);
        for (int e = 0; e < ready; e++) {
            Stream *s = events[e].data.ptr;
            for (;;) {
                ssize_t got = recv(s->fd, buf, sizeof buf, 0);
                if (got > 0) {
                    s->now = wall_now();
                    if (nghttp2_session_mem_recv(s->session, buf, (size_t)got) < 0) s->closed = 1;
                    continue;
                }
                if (got < 0 && errno == EINTR) continue;
                if (got == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) s->closed = 1;
                break;
            }
            if (nghttp2_session_send(s->session) != 0) s->closed = 1;
            /* a send the socket could not take yet: wait until it can */
            struct epoll_event ev = {.events = EPOLLIN | (nghttp2_session_want_write(s->session) ? EPOLLOUT : 0),
                                     .data.ptr = s};
            if (s->closed) {
                epoll_ctl(ep, EPOLL_CTL_DEL, s->fd, NULL);
                close(s->fd);
                s->fd = -1;
                open_streams--;
            } else {
                epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);
            }
        }
        if (!attached) {
            size_t with_first = 0;
            for (size_t i = 0; i < n; i++) with_first += streams[i].count > 0 || streams[i].closed;
            if (with_first == n) {
                attached = 1;
                printf("attached");
                print_usage();
                fflush(stdout);
            }
        }
    }

    printf("ended");
    print_usage();
    int failed = 0;
    for (size_t i = 0; i < n; i++) {
        Stream *s = &streams[i];
        failed |= s->status != 0;
        printf("S %ld %d %zu %s\n", s->id, s->status, s->count, s->grpc_message);
        for (size_t m = 0; m < s->count; m++) {
            printf("M %ld %.6f ", s->id, s->messages[m].t);
            const uint8_t *p = s->bytes + s->messages[m].offset;
            for (size_t b = 0; b < s->messages[m].length; b++) printf("%02x", p[b]);
            putchar('\n');
        }
    }
    printf("end\n");
    return failed;
}
