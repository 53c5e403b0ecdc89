/*
 * The kernel nbd driver's generic-netlink interface, spoken directly (no
 * libnl): connect a socket to /dev/nbdN, reconfigure it with a new socket
 * after a daemon restart (the dead-connection timeout keeps the device
 * alive meanwhile), and disconnect. Netlink rather than the ioctls, because
 * only netlink gives a device that survives its server's death.
 *
 * The backend identifier (/sys/block/nbdN/backend) names what a device
 * serves; the kernel refuses a reconfigure that names another, so a
 * restarted daemon cannot hand its disk to someone else's nbd device.
 */
#define _GNU_SOURCE
#include "CBlksnapLinux.h"

#include <errno.h>
#include <linux/genetlink.h>
#include <linux/nbd-netlink.h>
#include <linux/netlink.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

struct message {
	struct nlmsghdr nl;
	struct genlmsghdr genl;
	char attrs[1024];
};

static void *put_attr(struct message *m, unsigned short type, const void *data, size_t len)
{
	struct nlattr *a = (struct nlattr *)((char *)m + NLMSG_ALIGN(m->nl.nlmsg_len));
	a->nla_type = type;
	a->nla_len = NLA_HDRLEN + len;
	if (data)
		memcpy((char *)a + NLA_HDRLEN, data, len);
	m->nl.nlmsg_len = NLMSG_ALIGN(m->nl.nlmsg_len) + NLA_ALIGN(a->nla_len);
	return a;
}

static void put_u32(struct message *m, unsigned short type, uint32_t v) { put_attr(m, type, &v, sizeof(v)); }
static void put_u64(struct message *m, unsigned short type, uint64_t v) { put_attr(m, type, &v, sizeof(v)); }

/* Opens a netlink socket, sends m, and returns the ack's error (0 or -errno),
 * or fills *payload with the first answer when asked. */
static int transact(struct message *m, struct message *answer)
{
	int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_GENERIC);
	if (fd < 0)
		return -errno;
	struct sockaddr_nl kernel = { .nl_family = AF_NETLINK };
	m->nl.nlmsg_flags |= NLM_F_REQUEST | NLM_F_ACK;
	m->nl.nlmsg_seq = 1;
	if (sendto(fd, m, m->nl.nlmsg_len, 0, (struct sockaddr *)&kernel, sizeof(kernel)) < 0) {
		int e = -errno;
		close(fd);
		return e;
	}
	char buffer[8192];
	int result = -EIO;
	for (;;) {
		ssize_t n = recv(fd, buffer, sizeof(buffer), 0);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			result = -errno;
			break;
		}
		struct nlmsghdr *h = (struct nlmsghdr *)buffer;
		int done = 0;
		for (; NLMSG_OK(h, (size_t)n); h = NLMSG_NEXT(h, n)) {
			if (h->nlmsg_type == NLMSG_ERROR) {
				result = ((struct nlmsgerr *)NLMSG_DATA(h))->error;
				done = 1;
				break;
			}
			if (answer && h->nlmsg_len <= sizeof(*answer))
				memcpy(answer, h, h->nlmsg_len);
		}
		if (done)
			break;
	}
	close(fd);
	return result;
}

/* The generic-netlink family id of "nbd", or -errno (ENOENT: no nbd module). */
static int nbd_family(void)
{
	struct message m = { 0 }, answer = { 0 };
	m.nl.nlmsg_len = NLMSG_LENGTH(GENL_HDRLEN);
	m.nl.nlmsg_type = GENL_ID_CTRL;
	m.genl.cmd = CTRL_CMD_GETFAMILY;
	m.genl.version = 1;
	put_attr(&m, CTRL_ATTR_FAMILY_NAME, NBD_GENL_FAMILY_NAME, sizeof(NBD_GENL_FAMILY_NAME));
	int r = transact(&m, &answer);
	if (r < 0)
		return r;
	char *p = (char *)&answer + NLMSG_LENGTH(GENL_HDRLEN);
	char *end = (char *)&answer + answer.nl.nlmsg_len;
	while (p + NLA_HDRLEN <= end) {
		struct nlattr *a = (struct nlattr *)p;
		if (a->nla_len < NLA_HDRLEN)
			break;
		if (a->nla_type == CTRL_ATTR_FAMILY_ID)
			return *(uint16_t *)(p + NLA_HDRLEN);
		p += NLA_ALIGN(a->nla_len);
	}
	return -ENOENT;
}

static int start(struct message *m, uint8_t cmd)
{
	int family = nbd_family();
	if (family < 0)
		return family;
	memset(m, 0, sizeof(*m));
	m->nl.nlmsg_len = NLMSG_LENGTH(GENL_HDRLEN);
	m->nl.nlmsg_type = family;
	m->genl.cmd = cmd;
	m->genl.version = NBD_GENL_VERSION;
	return 0;
}

/* Each socket is one connection of the device: the kernel gives the device
 * a hardware queue per connection (at most one per CPU) and sends each
 * queue's requests on its own socket. 12 bytes a socket: the message holds
 * far more than BLKSNAP_NBD_MAX_SOCKETS. */
static int put_sockets(struct message *m, const int *sockfds, unsigned count)
{
	if (count == 0 || count > BLKSNAP_NBD_MAX_SOCKETS)
		return -EINVAL;
	struct nlattr *sockets = put_attr(m, NBD_ATTR_SOCKETS | NLA_F_NESTED, NULL, 0);
	for (unsigned i = 0; i < count; i++) {
		struct nlattr *item = put_attr(m, NBD_SOCK_ITEM | NLA_F_NESTED, NULL, 0);
		put_u32(m, NBD_SOCK_FD, (uint32_t)sockfds[i]);
		item->nla_len = (char *)m + m->nl.nlmsg_len - (char *)item;
	}
	sockets->nla_len = (char *)m + m->nl.nlmsg_len - (char *)sockets;
	return 0;
}

int blksnap_nbd_available(void)
{
	int f = nbd_family();
	return f < 0 ? f : 0;
}

static void put_backend(struct message *m, const char *backend)
{
	if (backend)
		put_attr(m, NBD_ATTR_BACKEND_IDENTIFIER, backend, strnlen(backend, 255) + 1);
}

int blksnap_nbd_connect(uint32_t index, const int *sockfds, unsigned count, uint64_t size, uint64_t block_size,
			uint64_t server_flags, uint64_t timeout_s, uint64_t dead_timeout_s,
			const char *backend)
{
	struct message m;
	int r = start(&m, NBD_CMD_CONNECT);
	if (r < 0)
		return r;
	put_u32(&m, NBD_ATTR_INDEX, index);
	put_u64(&m, NBD_ATTR_SIZE_BYTES, size);
	put_u64(&m, NBD_ATTR_BLOCK_SIZE_BYTES, block_size);
	put_u64(&m, NBD_ATTR_SERVER_FLAGS, server_flags);
	put_u64(&m, NBD_ATTR_TIMEOUT, timeout_s);
	put_u64(&m, NBD_ATTR_DEAD_CONN_TIMEOUT, dead_timeout_s);
	put_backend(&m, backend);
	r = put_sockets(&m, sockfds, count);
	return r < 0 ? r : transact(&m, NULL);
}

/* The kernel puts each socket in place of a dead connection of the device;
 * one more than it has dead is dropped without an error (ENOSPC is not
 * returned), so the caller must hand over no more than died. */
int blksnap_nbd_reconfigure(uint32_t index, const int *sockfds, unsigned count, uint64_t dead_timeout_s,
			    const char *backend)
{
	struct message m;
	int r = start(&m, NBD_CMD_RECONFIGURE);
	if (r < 0)
		return r;
	put_u32(&m, NBD_ATTR_INDEX, index);
	put_u64(&m, NBD_ATTR_DEAD_CONN_TIMEOUT, dead_timeout_s);
	put_backend(&m, backend);
	r = put_sockets(&m, sockfds, count);
	return r < 0 ? r : transact(&m, NULL);
}

int blksnap_nbd_disconnect(uint32_t index)
{
	struct message m;
	int r = start(&m, NBD_CMD_DISCONNECT);
	if (r < 0)
		return r;
	put_u32(&m, NBD_ATTR_INDEX, index);
	return transact(&m, NULL);
}
