/*
 * vmctl_native: the agent's hot paths in C (built by build.py with cffi in
 * API mode as vmctl_server._native).
 *
 * A table holds one process's VMAs parsed from /proc/PID/maps or
 * /proc/PID/smaps text; it fills residency (PAGEMAP_SCAN) and build ids
 * (PROCMAP_QUERY) with the kernel's binary interfaces and writes the packed
 * layout records and the protobuf wire bytes of GetVmaInfoResponse.vmas
 * without a Python object per VMA (vmctl_native.c). vmctl_advice.c holds
 * the process_madvise(2) batching loop and everything AdviseRanges does per
 * range. Every result equals the pure-Python reference
 * (vmctl_server/pytable.py, pyranges.py, advice.py and syscalls.py); errors
 * come back as -errno.
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

/*
 * The layout alone (what /proc/PID/maps says) from a PROCMAP_QUERY loop on
 * maps_fd, one ioctl per VMA with its name, then tail (maps text: the gate
 * VMA, [vsyscall], which maps prints and PROCMAP_QUERY never finds) parsed
 * as maps lines. The table equals the one vmctl_table_read makes of the
 * maps text: names are escaped as seq_path escapes them ("\n" as "\\012").
 * 0 and *out; -errno of a failed ioctl (-ENOTTY: no PROCMAP_QUERY in this
 * kernel; -ENAMETOOLONG: a name beyond PATH_MAX), for the caller to read
 * the maps text instead; -EINVAL with *bad_line for a malformed tail; -ENOMEM.
 */
int vmctl_table_query(int maps_fd, const char *tail, size_t tail_len, struct vmctl_table **out, size_t *bad_line);
/*
 * The same table for its layout records alone (vmctl_table_layout): a file
 * VMA's name is not asked (its path is left empty), so the kernel does not
 * print paths; only VMAs without a file are asked their names, for their kind.
 */
int vmctl_table_query_layout(int maps_fd, const char *tail, size_t tail_len, struct vmctl_table **out,
			     size_t *bad_line);
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

/*
 * The same wire bytes without a prefix, cut at VMA boundaries into chunks of
 * at most max_chunk bytes, each one a whole StreamVmaInfoResponse: chunk i
 * is (*out)[(*ends)[i - 1] .. (*ends)[i]) with (*ends)[-1] taken as 0, and
 * there are *chunk_count of them (none for a table without VMAs). Each chunk
 * holds as many VMAs as fit. Release *out and *ends with vmctl_free. 0,
 * -ENOMEM, or -E2BIG when one VMA alone takes more than max_chunk bytes.
 */
int vmctl_table_encode_chunks(const struct vmctl_table *table, uint32_t mask, size_t max_chunk, char **out,
			      size_t *out_len, size_t **ends, size_t *chunk_count);
void vmctl_free(void *buffer);

/*
 * process_madvise(2) over n segments (each at most MAX_RW_COUNT bytes) in as
 * few calls as the kernel allows; advised[i] and errors[i] (errno or 0) per
 * segment, both zeroed by the caller. Returns the number of system calls, or
 * -EINVAL (a segment ends before it starts) or -ENOMEM before any call.
 */
long vmctl_advise(int pidfd, const struct vmctl_segment *segments, size_t n, int advice, uint64_t *advised,
		  int *errors);

/*
 * AdviseRanges (vmctl_advice.c): the ranges of one request, checked and
 * planned as advice.py's check_ranges and plan_ranges do, advised, and the
 * reply's per-range results written as protobuf wire bytes.
 */

/* Why ranges were refused: VMCTL_ and a reason of advice.RANGE_REASONS, which range_fault words. */
enum {
	VMCTL_RANGES_OK = 0,
	VMCTL_RANGE_UNALIGNED = 1,
	VMCTL_RANGE_EMPTY = 2,
	VMCTL_RANGE_WRAPS = 3,
	VMCTL_RANGE_OVERLAP = 4,
	VMCTL_RANGE_UNMAPPED = 5
};

struct vmctl_range_fault {
	int reason;	  /* VMCTL_RANGE_* */
	size_t index;	  /* the range refused */
	size_t before;	  /* RANGE_OVERLAP: the range it overlaps, just before it in address order */
	uint64_t address; /* RANGE_UNMAPPED: the first address of it that nothing maps */
};

/* One range's outcome: the fields of vmctl.v1.RangeResult. */
struct vmctl_range_outcome {
	uint64_t start;
	uint64_t end;
	uint64_t advised;
	uint64_t skipped;
	int err;     /* the errno that stopped part of the range, or 0 */
	int changed; /* 1: left out, RANGE_CHANGED (vmctl_plan_exclude) */
};

/* Opaque: one request's ranges split into the pieces to advise. */
struct vmctl_plan;

/*
 * The `repeated AddressRange ranges = 2` of an AdviseRangesRequest's wire
 * bytes (which protobuf has already parsed: this only reads the values),
 * into out[0..n). 0 when there were exactly n; -ENOTSUP when the bytes use
 * an encoding left to protobuf (groups, a field of an unexpected wire type,
 * a varint beyond 64 bits) or hold another number of ranges.
 */
int vmctl_request_ranges(const char *data, size_t len, struct vmctl_segment *out, size_t n);

/* The sum of max(0, end - start) over the ranges, as 128 bits. */
void vmctl_ranges_bytes(const struct vmctl_segment *ranges, size_t n, uint64_t *low, uint64_t *high);

/*
 * advice.check_ranges after its count checks: alignment to page_size,
 * emptiness, wrap-around, then overlap. 0, or VMCTL_RANGE_* with *fault
 * filled; -ENOMEM.
 */
int vmctl_ranges_check(const struct vmctl_segment *ranges, size_t n, uint64_t page_size,
		       struct vmctl_range_fault *fault);

/*
 * advice.plan_ranges and split_for_calls: each range (checked already) split
 * at the VMA boundaries of the layout (record_count layout.LAYOUT_RECORD
 * records, in address order), keeping the parts whose kind is in
 * admitted_kinds (bit 1 << kind), each cut to MAX_RW_COUNT bytes. 0 and
 * *out; VMCTL_RANGE_UNMAPPED with *fault filled; -ENOMEM.
 */
int vmctl_plan_new(const struct vmctl_segment *ranges, size_t n, const char *records, size_t record_count,
		   uint32_t admitted_kinds, struct vmctl_plan **out, struct vmctl_range_fault *fault);
void vmctl_plan_free(struct vmctl_plan *plan);

/* The outcome of every range, in request order (n of them). */
const struct vmctl_range_outcome *vmctl_plan_outcomes(const struct vmctl_plan *plan);

/* The pieces to advise, in order, and the range each belongs to. */
const struct vmctl_segment *vmctl_plan_pieces(const struct vmctl_plan *plan, size_t *count, const size_t **owners);

uint64_t vmctl_plan_requested(const struct vmctl_plan *plan);
uint64_t vmctl_plan_advised(const struct vmctl_plan *plan);

/*
 * SCOPE_RANGES: leave out every range i with changed[i] nonzero (no piece of
 * it is advised, its outcome says changed, its skipped bytes are 0). Returns
 * how many ranges were left out.
 */
size_t vmctl_plan_exclude(struct vmctl_plan *plan, const uint8_t *changed);

/*
 * SCOPE_RANGES's check (advice.ranges_changed): whether each range still
 * lies wholly in memory of the kind the snapshot (record_count layout
 * records, which cover every range: plan it first) saw there: anonymous
 * stays anonymous, special stays special, a file stays the same device and
 * inode at the same offsets; VMA boundaries may have moved. changed[i] = 1
 * when range i did not. The live VMAs come from one PROCMAP_QUERY ioctl per
 * live VMA the range crosses, on maps_fd (/proc/PID/maps). The number of
 * changed ranges, or -errno (-ENOTTY: no PROCMAP_QUERY; -ESRCH; -ENOMEM).
 */
long vmctl_ranges_covering(int maps_fd, const struct vmctl_segment *ranges, size_t n, const char *records,
			   size_t record_count, uint8_t *changed);

/* The same against a live layout read from /proc/PID/maps (live_count layout records), where
 * there is no PROCMAP_QUERY. */
long vmctl_ranges_covering_records(const struct vmctl_segment *ranges, size_t n, const char *records,
				   size_t record_count, const char *live, size_t live_count, uint8_t *changed);

/* What a dry run reports: every piece counted as advised, no call made. */
void vmctl_plan_dry_run(struct vmctl_plan *plan);

/*
 * vmctl_advise over the pieces, the outcome added to their ranges. Returns
 * the number of calls, or -ENOMEM before any. *first_error is the errno of
 * the first piece that failed when no piece advised a byte, else 0.
 */
long vmctl_plan_apply(struct vmctl_plan *plan, int pidfd, int advice, int *first_error);

/*
 * prefix (the rest of the reply, already serialized), then the wire bytes
 * of `repeated RangeResult ranges = 4` of AdviseRangesResponse, in one
 * buffer released with vmctl_free. An error is named errno_names[err] when
 * err < name_count (Python's errno.errorcode), else in decimal. 0 or -ENOMEM.
 */
int vmctl_plan_encode(const struct vmctl_plan *plan, const char *prefix, size_t prefix_len,
		      char *const *errno_names, size_t name_count, char **out, size_t *out_len);

/* cdef: end */

#endif /* VMCTL_NATIVE_H */
