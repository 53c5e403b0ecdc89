#define _GNU_SOURCE
#include "CBlksnapLinux.h"

#include <fcntl.h>
#include <unistd.h>
#include <linux/falloc.h>
#include <stddef.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/sysmacros.h>
#include <sys/socket.h>

const int blksnap_o_direct = O_DIRECT;

int blksnap_punch_hole(int fd, off_t offset, off_t length)
{
	return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
}

int blksnap_pipe(int fds[2], int size, int *capacity)
{
	if (pipe2(fds, O_CLOEXEC) != 0)
		return -1;
	/* Past /proc/sys/fs/pipe-max-size only with CAP_SYS_RESOURCE: then at
	 * least that much rather than the 64 KiB a pipe starts with. */
	if (fcntl(fds[1], F_SETPIPE_SZ, size) < 0)
		fcntl(fds[1], F_SETPIPE_SZ, 1 << 20);
	*capacity = fcntl(fds[1], F_GETPIPE_SZ);
	if (*capacity <= 0)
		*capacity = 65536;
	return 0;
}

ssize_t blksnap_splice(int from, int64_t *from_offset, int to, int64_t *to_offset, size_t count)
{
	loff_t in, out;
	ssize_t n;

	if (from_offset)
		in = *from_offset;
	if (to_offset)
		out = *to_offset;
	n = splice(from, from_offset ? &in : NULL, to, to_offset ? &out : NULL, count, SPLICE_F_MOVE);
	if (from_offset)
		*from_offset = in;
	if (to_offset)
		*to_offset = out;
	return n;
}

int blksnap_peer_credentials(int fd, pid_t *pid, uid_t *uid, gid_t *gid)
{
	struct ucred cred;
	socklen_t length = sizeof(cred);

	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &length) != 0)
		return -1;
	*pid = cred.pid;
	*uid = cred.uid;
	*gid = cred.gid;
	return 0;
}

int blksnap_peer_in_group(int fd, gid_t gid)
{
	gid_t groups[256];
	socklen_t length = sizeof(groups);

	if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups, &length) != 0)
		return -1;
	for (size_t i = 0; i < length / sizeof(gid_t); i++)
		if (groups[i] == gid)
			return 1;
	return 0;
}

int blksnap_accept_cloexec(int fd)
{
	return accept4(fd, NULL, NULL, SOCK_CLOEXEC);
}

const unsigned long blksnap_ioctl_fifreeze = FIFREEZE;
const unsigned long blksnap_ioctl_fithaw = FITHAW;
const unsigned long blksnap_ioctl_blkflsbuf = BLKFLSBUF;
const unsigned long blksnap_ioctl_blkgetsize64 = BLKGETSIZE64;

dev_t blksnap_makedev(unsigned int major, unsigned int minor)
{
	return makedev(major, minor);
}

unsigned int blksnap_major(dev_t dev)
{
	return major(dev);
}

unsigned int blksnap_minor(dev_t dev)
{
	return minor(dev);
}

int blksnap_syncfs(int fd)
{
	return syncfs(fd);
}
