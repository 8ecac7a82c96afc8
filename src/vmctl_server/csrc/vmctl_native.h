/*
 * vmctl_native: the agent's hot paths in C (built by build.py with cffi in
 * API mode as vmctl_server._native).
 *
 * A table holds one process's VMAs parsed from /proc/PID/maps or
 * /proc/PID/smaps text; it fills residency (PAGEMAP_SCAN) and build ids
 * (PROCMAP_QUERY) with the kernel's binary interfaces and writes the packed
 * layout records and the protobuf wire bytes of GetVmaInfoResponse.vmas
 * without a Python object per VMA. vmctl_advise is the process_madvise(2)
 * batching loop. Every result equals the pure-Python reference
 * (vmctl_server/pytable.py and syscalls.py); errors come back as -errno.
 */
#ifndef VMCTL_NATIVE_H
#define VMCTL_NATIVE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

/*
 * Kernel ABI from include/uapi/linux/fs.h (Linux 6.11+). Defined here
 * because the build machine's headers may predate PROCMAP_QUERY and
 * PAGEMAP_SCAN. build.py gives cffi syscalls.KERNEL_CDEF for these structs,
 * so the extension refuses to load if they ever differ from it.
 */
struct procmap_query {
	uint64_t size;
	uint64_t query_flags;
	uint64_t query_addr;
	uint64_t vma_start;
	uint64_t vma_end;
	uint64_t vma_flags;
	uint64_t vma_page_size;
	uint64_t vma_offset;
	uint64_t inode;
	uint32_t dev_major;
	uint32_t dev_minor;
	uint32_t vma_name_size;
	uint32_t build_id_size;
	uint64_t vma_name_addr;
	uint64_t build_id_addr;
};

struct page_region {
	uint64_t start;
	uint64_t end;
	uint64_t categories;
};

struct pm_scan_arg {
	uint64_t size;
	uint64_t flags;
	uint64_t start;
	uint64_t end;
	uint64_t walk_end;
	uint64_t vec;
	uint64_t vec_len;
	uint64_t max_pages;
	uint64_t category_inverted;
	uint64_t category_mask;
	uint64_t category_anyof_mask;
	uint64_t return_mask;
};

/* cdef: begin (build.py hands this part to cffi as the module's API) */

/* Opaque: one process's VMAs. */
struct vmctl_table;

/* One address range to advise, end exclusive. */
struct vmctl_segment {
	uint64_t start;
	uint64_t end;
};

/*
 * Parse /proc/PID/maps (or smaps) text. 0 and *out on success; -EINVAL for
 * text that is not in the kernel's format, with *bad_line the 1-based line
 * number; -ENOMEM.
 */
int vmctl_table_from_maps(const char *data, size_t len, struct vmctl_table **out, size_t *bad_line);
int vmctl_table_from_smaps(const char *data, size_t len, struct vmctl_table **out, size_t *bad_line);

/*
 * The same, reading the text from fd to its end (smaps if smaps is nonzero),
 * each read at most chunk bytes (0: no limit; the tests use small ones), so
 * that one call with the GIL released both reads and parses. -EINVAL with
 * *bad_line >= 1 for malformed text; a failed read gives its -errno with
 * *bad_line 0; -ENOMEM.
 */
int vmctl_table_read(int fd, int smaps, size_t chunk, struct vmctl_table **out, size_t *bad_line);
void vmctl_table_free(struct vmctl_table *table);
size_t vmctl_table_len(const struct vmctl_table *table);

/* Packed layout records, 48 bytes per VMA (layout.LAYOUT_RECORD), into out. */
void vmctl_table_layout(const struct vmctl_table *table, char *out);

/* rss/swap of every VMA from one PAGEMAP_SCAN walk; 0 or -errno. */
int vmctl_table_fill_residency(struct vmctl_table *table, int pagemap_fd);

/* Build id of every file VMA with PROCMAP_QUERY; 0 or -errno. */
int vmctl_table_fill_build_ids(struct vmctl_table *table, int maps_fd);

/*
 * prefix (prefix_len bytes: the rest of the reply, already serialized), then
 * the wire bytes of `repeated Vma vmas = 4` for the VmaAttr groups in mask,
 * in one buffer the caller releases with vmctl_free. 0 or -ENOMEM.
 */
int vmctl_table_encode(const struct vmctl_table *table, uint32_t mask, const char *prefix, size_t prefix_len,
		       char **out, size_t *out_len);
void vmctl_free(void *buffer);

/*
 * process_madvise(2) over n segments (each at most MAX_RW_COUNT bytes) in as
 * few calls as the kernel allows; advised[i] and errors[i] (errno or 0) per
 * segment, both zeroed by the caller. Returns the number of system calls, or
 * -EINVAL (a segment ends before it starts) or -ENOMEM before any call.
 */
long vmctl_advise(int pidfd, const struct vmctl_segment *segments, size_t n, int advice, uint64_t *advised,
		  int *errors);

/* cdef: end */

#endif /* VMCTL_NATIVE_H */
