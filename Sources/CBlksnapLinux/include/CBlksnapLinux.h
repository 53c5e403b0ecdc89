/*
 * CBlksnapLinux: Linux calls and constants that Swift's Glibc module does
 * not import without _GNU_SOURCE, exported as prefixed functions and values
 * (the CNIOLinux pattern).
 */
#ifndef CBLKSNAPLINUX_H
#define CBLKSNAPLINUX_H

#include <stdint.h>
#include <sys/types.h>
#include <linux/loop.h>

extern const int blksnap_o_direct;

/* fallocate(2) with FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE. */
int blksnap_punch_hole(int fd, off_t offset, off_t length);

/* A close-on-exec pipe of at least `size` bytes where the kernel allows
 * (F_SETPIPE_SZ); 0, with the capacity it has in *capacity, or -1 with errno. */
int blksnap_pipe(int fds[2], int size, int *capacity);
/* splice(2) with SPLICE_F_MOVE; a null offset pointer for a pipe's end. */
ssize_t blksnap_splice(int from, int64_t *from_offset, int to, int64_t *to_offset, size_t count);


/* Descriptor passing (fd_passing.c). send: one message, with `fd` as
 * SCM_RIGHTS unless it is -1, to `to` when given (a datagram socket) else
 * to the connected peer. recv: one message; *fd is the descriptor it
 * carried (close-on-exec) or -1. */
struct sockaddr;
ssize_t blksnap_send_with_fd(int sock, const struct sockaddr *to, unsigned int tolen,
			     const void *buf, size_t len, int fd);
ssize_t blksnap_recv_with_fd(int sock, void *buf, size_t len, int *fd);
/* posix_spawn in a new session with stdin on /dev/null and `fd3` (unless
 * -1) as descriptor 3. */
int blksnap_spawn_detached(const char *path, char *const argv[], int fd3, pid_t *pid);

/* SO_PEERCRED of a connected Unix socket; 0 or -1 with errno. */
int blksnap_peer_credentials(int fd, pid_t *pid, uid_t *uid, gid_t *gid);

/* 1 when the peer of a connected Unix socket has `gid` among its groups
 * (SO_PEERGROUPS, the supplementary groups SO_PEERCRED leaves out), 0 when
 * not, -1 with errno when the kernel cannot say. */
int blksnap_peer_in_group(int fd, gid_t gid);

/* accept4(fd, NULL, NULL, SOCK_CLOEXEC). */
int blksnap_accept_cloexec(int fd);

/* Block and filesystem ioctls whose numbers are function-like macros. */
extern const unsigned long blksnap_ioctl_fifreeze;
extern const unsigned long blksnap_ioctl_fithaw;
extern const unsigned long blksnap_ioctl_blkflsbuf;
extern const unsigned long blksnap_ioctl_blkgetsize64;

int blksnap_syncfs(int fd);

/* The kernel nbd driver over generic netlink (nbd_netlink.c); each returns
 * 0 or -errno (-ENOENT: the nbd module is not loaded). */
#define BLKSNAP_NBD_MAX_SOCKETS 16
int blksnap_nbd_available(void);
int blksnap_nbd_connect(uint32_t index, const int *sockfds, unsigned count, uint64_t size, uint64_t block_size,
			uint64_t server_flags, uint64_t timeout_s, uint64_t dead_timeout_s,
			const char *backend);
int blksnap_nbd_reconfigure(uint32_t index, const int *sockfds, unsigned count, uint64_t dead_timeout_s,
			    const char *backend);
int blksnap_nbd_disconnect(uint32_t index);

/* makedev/major/minor are macros in glibc. */
dev_t blksnap_makedev(unsigned int major, unsigned int minor);
unsigned int blksnap_major(dev_t dev);
unsigned int blksnap_minor(dev_t dev);

#endif
