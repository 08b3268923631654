/*
 * Guest side of the capsa-vsock end-to-end test. Built with `gcc -static`
 * by the test and run by capsa-init (capsa.run=/bin/vsock-test).
 *
 *   port 5000  echo (one process per connection)
 *   port 5002  sink: counts bytes until EOF, answers "<count>\n"
 *   port 5003  source: reads "<count>\n", sends that many bytes, closes
 *   port 5001  control: "reset\n" rebinds the virtio-vsock driver (a guest
 *              driver reset), "quit\n" exits (capsa-init then powers off)
 *
 * At start it also connects to the host (CID 2) port 6000 (expects a reply)
 * and port 6001 (expects a refusal), and prints the results.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/vm_sockets.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int listen_port(unsigned port) {
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    struct sockaddr_vm a = {0};
    a.svm_family = AF_VSOCK;
    a.svm_cid = VMADDR_CID_ANY;
    a.svm_port = port;
    if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 128) < 0) {
        printf("vsock-test: listen %u failed: %s\n", port, strerror(errno));
        exit(1);
    }
    return s;
}

static void echo_conn(int c) {
    static char buf[1 << 16];
    for (;;) {
        ssize_t n = read(c, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        if (write_all(c, buf, (size_t)n) < 0) break;
    }
    shutdown(c, SHUT_WR);
}

static void sink_conn(int c) {
    static char buf[1 << 16];
    unsigned long long total = 0;
    for (;;) {
        ssize_t n = read(c, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        total += (unsigned long long)n;
    }
    char line[64];
    int len = snprintf(line, sizeof line, "%llu\n", total);
    write_all(c, line, (size_t)len);
    shutdown(c, SHUT_WR);
}

static void source_conn(int c) {
    static char buf[1 << 16];
    char line[64] = {0};
    size_t got = 0;
    while (got < sizeof line - 1) {
        ssize_t n = read(c, line + got, 1);
        if (n <= 0) return;
        if (line[got] == '\n') break;
        got++;
    }
    unsigned long long want = strtoull(line, NULL, 10);
    memset(buf, 'z', sizeof buf);
    while (want > 0) {
        size_t n = want < sizeof buf ? (size_t)want : sizeof buf;
        if (write_all(c, buf, n) < 0) return;
        want -= n;
    }
    shutdown(c, SHUT_WR);
}

static pid_t serve(int ls, void (*fn)(int)) {
    pid_t pid = fork();
    if (pid != 0) return pid;
    signal(SIGCHLD, SIG_IGN); /* reap connection children automatically */
    for (;;) {
        int c = accept(ls, NULL, NULL);
        if (c < 0) {
            if (errno != EINTR) usleep(10000);
            continue;
        }
        if (fork() == 0) {
            close(ls);
            fn(c);
            close(c);
            _exit(0);
        }
        close(c);
    }
}

static int connect_host(unsigned port, int *err) {
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    struct sockaddr_vm a = {0};
    a.svm_family = AF_VSOCK;
    a.svm_cid = VMADDR_CID_HOST;
    a.svm_port = port;
    if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) {
        *err = errno;
        close(s);
        return -1;
    }
    return s;
}

static void guest_to_host(void) {
    int err = 0, s = -1;
    for (int i = 0; i < 100 && s < 0; i++) {
        s = connect_host(6000, &err);
        if (s < 0) usleep(100000);
    }
    if (s < 0) {
        printf("guest-client: connect failed: %s\n", strerror(err));
    } else {
        const char *msg = "hello-from-guest\n";
        write_all(s, msg, strlen(msg));
        shutdown(s, SHUT_WR);
        char buf[256] = {0};
        size_t got = 0;
        for (;;) {
            ssize_t n = read(s, buf + got, sizeof buf - 1 - got);
            if (n <= 0) break;
            got += (size_t)n;
        }
        buf[strcspn(buf, "\n")] = 0;
        printf("guest-client: %s\n", buf);
        close(s);
    }
    s = connect_host(6001, &err);
    if (s < 0)
        printf("guest-refused: %s\n", strerror(err));
    else
        printf("guest-refused: unexpectedly connected\n");
    fflush(stdout);
}

static int write_file(const char *path, const char *val) {
    int fd = open(path, O_WRONLY);
    if (fd < 0) return -1;
    int r = write_all(fd, val, strlen(val));
    close(fd);
    return r;
}

/* Unbind and rebind the virtio-vsock driver: a guest driver reset. */
static void driver_reset(void) {
    const char *drv = "/sys/bus/virtio/drivers/vmw_vsock_virtio_transport";
    DIR *d = opendir(drv);
    char dev[256] = {0};
    struct dirent *e;
    while (d && (e = readdir(d))) {
        if (strncmp(e->d_name, "virtio", 6) == 0) {
            snprintf(dev, sizeof dev, "%s", e->d_name);
            break;
        }
    }
    if (d) closedir(d);
    char path[512];
    snprintf(path, sizeof path, "%s/unbind", drv);
    int a = write_file(path, dev);
    usleep(200000);
    snprintf(path, sizeof path, "%s/bind", drv);
    int b = write_file(path, dev);
    printf("vsock-test: reset %s unbind=%d bind=%d\n", dev, a, b);
    fflush(stdout);
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    unsigned cid = 0;
    int fd = open("/dev/vsock", O_RDONLY);
    if (fd >= 0 && ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, &cid) == 0)
        printf("guest-cid: %u\n", cid);
    else
        printf("guest-cid: unknown (%s)\n", strerror(errno));
    if (fd >= 0) close(fd);

    int echo = listen_port(5000), sink = listen_port(5002), source = listen_port(5003);
    int ctl = listen_port(5001);
    pid_t kids[3] = {serve(echo, echo_conn), serve(sink, sink_conn), serve(source, source_conn)};
    close(echo);
    close(sink);
    close(source);
    guest_to_host();
    printf("vsock-test: listening\n");
    for (;;) {
        int c = accept(ctl, NULL, NULL);
        if (c < 0) continue;
        char line[64] = {0};
        size_t got = 0;
        while (got < sizeof line - 1) {
            ssize_t n = read(c, line + got, 1);
            if (n <= 0) break;
            if (line[got] == '\n') break;
            got++;
        }
        if (strncmp(line, "quit", 4) == 0) {
            write_all(c, "bye\n", 4);
            close(c);
            break;
        }
        if (strncmp(line, "reset", 5) == 0) {
            write_all(c, "resetting\n", 10);
            close(c);
            driver_reset();
            printf("vsock-test: reset done\n");
            continue;
        }
        close(c);
    }
    for (int i = 0; i < 3; i++) kill(kids[i], SIGKILL);
    while (wait(NULL) > 0) {
    }
    printf("vsock-test: exit\n");
    return 0;
}
