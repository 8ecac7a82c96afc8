/*
 * bench/floor.c: the kernel's floors, measured in C, for make bench.
 *
 * bench/run.py compiles this with cc into its temporary directory at start
 * and talks to it over a pipe, one command a line, so its variants are timed
 * in the same interleaved rounds as vmctl's. Each command times itself with
 * CLOCK_MONOTONIC around the work alone (the pipe is not counted) and
 * answers "NANOSECONDS VALUE":
 *
 *   read PID NAME     read /proc/PID/NAME (maps, smaps) to its end into a
 *                     buffer allocated beforehand (value: bytes)
 *   query PID NAMES   a PROCMAP_QUERY loop over every VMA, opening
 *                     /proc/PID/maps first; NAMES 1 asks each VMA's name
 *                     into a PATH_MAX buffer, 0 none (value: VMAs)
 *   smaps PID         read /proc/PID/smaps to its end and parse it: every
 *                     header's numbers and every "Key: N kB" value into a
 *                     per-VMA array of 24 counters, VmFlags and THPeligible
 *                     kept as text/flag (value: VMAs)
 *   query1 PID ADDR   open /proc/PID/maps, one PROCMAP_QUERY for the VMA
 *                     covering ADDR (hex), no name (value: its end, or -errno)
 *   madvise PID START END ADVICE
 *                     pidfd_open, one process_madvise of one iovec, close
 *                     (value: bytes advised, or -errno)
 *
 * A straightforward C programme, written for speed but not tuned beyond
 * what a careful engineer would write in an afternoon: what a user of the
 * kernel's interfaces pays with no Python at all.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

struct procmap_query {
	uint64_t size, query_flags, query_addr, vma_start, vma_end, vma_flags, vma_page_size, vma_offset, inode;
	uint32_t dev_major, dev_minor, vma_name_size, build_id_size;
	uint64_t vma_name_addr, build_id_addr;
};
#define PROCMAP_QUERY _IOWR('f', 17, struct procmap_query)
#define PROCMAP_QUERY_COVERING_OR_NEXT_VMA 0x10

static char *buf;
static size_t buf_cap = 256u << 20;

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static long read_all(const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	size_t have = 0;
	ssize_t n;

	if (fd < 0)
		return -errno;
	while ((n = read(fd, buf + have, buf_cap - have)) > 0)
		have += (size_t)n;
	close(fd);
	return n < 0 ? -errno : (long)have;
}

static long query(int pid, int names)
{
	static char name[PATH_MAX];
	struct procmap_query q;
	char path[64];
	uint64_t addr = 0;
	long count = 0;
	int fd;

	snprintf(path, sizeof(path), "/proc/%d/maps", pid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	for (;;) {
		memset(&q, 0, sizeof(q));
		q.size = sizeof(q);
		q.query_flags = PROCMAP_QUERY_COVERING_OR_NEXT_VMA;
		q.query_addr = addr;
		if (names) {
			q.vma_name_addr = (uint64_t)(uintptr_t)name;
			q.vma_name_size = sizeof(name);
		}
		if (ioctl(fd, PROCMAP_QUERY, &q) < 0) {
			long err = errno == ENOENT ? count : -errno;

			close(fd);
			return err;
		}
		count++;
		addr = q.vma_end;
	}
}

static long query_one(int pid, uint64_t addr)
{
	struct procmap_query q;
	char path[64];
	long value;
	int fd;

	snprintf(path, sizeof(path), "/proc/%d/maps", pid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	memset(&q, 0, sizeof(q));
	q.size = sizeof(q);
	q.query_addr = addr;
	value = ioctl(fd, PROCMAP_QUERY, &q) < 0 ? -errno : (long)q.vma_end;
	close(fd);
	return value;
}

static uint64_t number(const char **pp, const char *e, int base)
{
	const char *p = *pp;
	uint64_t v = 0;

	for (; p < e; p++) {
		unsigned c = (unsigned char)*p, d;

		if (c - '0' < 10)
			d = c - '0';
		else if (base == 16 && c - 'a' < 6)
			d = c - 'a' + 10;
		else
			break;
		v = v * (unsigned)base + d;
	}
	*pp = p;
	return v;
}

struct vma {
	uint64_t start, end, offset, inode, counters[24];
	uint32_t major, minor;
	const char *path, *vm_flags;
	int thp;
};

static long smaps(int pid)
{
	static struct vma *vmas;
	static size_t cap;
	char path[64];
	long len, count = 0;
	const char *p, *e;

	snprintf(path, sizeof(path), "/proc/%d/smaps", pid);
	len = read_all(path);
	if (len < 0)
		return len;
	for (p = buf, e = buf + len; p < e;) {
		const char *eol = memchr(p, '\n', (size_t)(e - p));
		const char *q = p;

		if (!eol)
			eol = e;
		if ((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f')) {
			struct vma *v;

			if ((size_t)count == cap) {
				cap = cap ? cap * 2 : 4096;
				vmas = realloc(vmas, cap * sizeof(*vmas));
			}
			v = &vmas[count++];
			memset(v, 0, sizeof(*v));
			v->start = number(&q, eol, 16);
			q++;
			v->end = number(&q, eol, 16);
			q += 6;
			v->offset = number(&q, eol, 16);
			q++;
			v->major = (uint32_t)number(&q, eol, 16);
			q++;
			v->minor = (uint32_t)number(&q, eol, 16);
			q++;
			v->inode = number(&q, eol, 10);
			while (q < eol && *q == ' ')
				q++;
			v->path = q;
		} else if (count) {
			struct vma *v = &vmas[count - 1];
			const char *colon = memchr(p, ':', (size_t)(eol - p));
			size_t klen;

			if (colon) {
				klen = (size_t)(colon - p);
				q = colon + 1;
				while (q < eol && *q == ' ')
					q++;
				if (klen == 7 && !memcmp(p, "VmFlags", 7))
					v->vm_flags = q;
				else if (klen == 11 && !memcmp(p, "THPeligible", 11))
					v->thp = *q == '1';
				else
					/* one counter per key, by its length and first letter */
					v->counters[(klen * 7 + (unsigned char)*p) % 24] = number(&q, eol, 10) * 1024;
			}
		}
		p = eol + 1;
	}
	return count;
}

static long advise(int pid, uint64_t start, uint64_t end, int advice)
{
	struct iovec iov = {(void *)(uintptr_t)start, (size_t)(end - start)};
	int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
	long n;

	if (pidfd < 0)
		return -errno;
	n = syscall(SYS_process_madvise, pidfd, &iov, 1, advice, 0);
	if (n < 0)
		n = -errno;
	close(pidfd);
	return n;
}

int main(void)
{
	char line[256], path[64];

	buf = malloc(buf_cap);
	if (!buf)
		return 1;
	setvbuf(stdout, NULL, _IOLBF, 0);
	while (fgets(line, sizeof(line), stdin)) {
		char cmd[16], name[16];
		int pid = 0, names = 0, advice = 0;
		unsigned long long start = 0, end = 0;
		uint64_t began;
		long value;

		if (sscanf(line, "%15s %d", cmd, &pid) < 2) {
			printf("0 -22\n");
			continue;
		}
		began = now_ns();
		if (!strcmp(cmd, "read") && sscanf(line, "%*s %*d %15s", name) == 1) {
			snprintf(path, sizeof(path), "/proc/%d/%s", pid, name);
			began = now_ns();
			value = read_all(path);
		} else if (!strcmp(cmd, "query1") && sscanf(line, "%*s %*d %llx", &start) == 1) {
			began = now_ns();
			value = query_one(pid, start);
		} else if (!strcmp(cmd, "query") && sscanf(line, "%*s %*d %d", &names) == 1) {
			began = now_ns();
			value = query(pid, names);
		} else if (!strcmp(cmd, "smaps")) {
			began = now_ns();
			value = smaps(pid);
		} else if (!strcmp(cmd, "madvise") && sscanf(line, "%*s %*d %llx %llx %d", &start, &end, &advice) == 3) {
			began = now_ns();
			value = advise(pid, start, end, advice);
		} else {
			value = -EINVAL;
		}
		printf("%llu %ld\n", (unsigned long long)(now_ns() - began), value);
	}
	return 0;
}
