/*
 * vmctl_advice.c: AdviseRanges without a Python object per range (see
 * vmctl_native.h). Each function has a pure-Python twin that must give the
 * same answer: the ranges read from a request (protobuf's own parse), the
 * checks and the plan (advice.check_ranges, plan_ranges, split_for_calls),
 * the process_madvise(2) loop (syscalls.advise_segments) and the reply's
 * RangeResults (pyranges.PyPlan.encode, by the protobuf library);
 * tests/test_native_equivalence.py holds them together.
 */
#define _GNU_SOURCE

#include "vmctl_native.h"
#include "vmctl_internal.h"

#include <endian.h>
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SYS_process_madvise
#define SYS_process_madvise 440 /* the same on every architecture */
#endif

#define MAX_IOVECS 1024 /* UIO_MAXIOV, as syscalls.UIO_MAXIOV */
#define MAX_RW_COUNT UINT64_C(0x7FFFF000)

/* Field numbers: AdviseRangesRequest.ranges, AddressRange.start/end,
 * AdviseRangesResponse.ranges, RangeResult's fields. */
#define REQUEST_RANGES 2u
#define RANGE_START 1u
#define RANGE_END 2u
#define RESPONSE_RANGES_TAG 0x22 /* field 4, length-delimited */
#define RESULT_START 1u
#define RESULT_END 2u
#define RESULT_ADVISED 3u
#define RESULT_SKIPPED 4u
#define RESULT_ERROR 5u
#define RESULT_ERROR_NUMBER 6u
#define RESULT_REASON 7u

/* RangeResult.reason of a range vmctl_plan_exclude left out (words.RANGE_RESULT_REASONS). */
static const char RANGE_CHANGED[] = "RANGE_CHANGED";

#ifndef PROCMAP_QUERY
#define PROCMAP_QUERY _IOWR('f', 17, struct procmap_query)
#endif
/* A VMA's name: file paths are at most PATH_MAX; anonymous names are short. */
#define VMA_NAME_MAX 4352

/* ------------------------------------------------------- the request */

/* A varint of at most 64 bits (10 bytes) at *p; false at the end of the
 * data or for one that carries more bits (protobuf truncates those). */
static bool get_varint(const uint8_t **p, const uint8_t *e, uint64_t *out)
{
	uint64_t v = 0;

	for (unsigned shift = 0; shift < 64; shift += 7) {
		uint8_t b;

		if (*p == e)
			return false;
		b = *(*p)++;
		if (shift == 63 && b > 1)
			return false;
		v |= (uint64_t)(b & 0x7f) << shift;
		if (!(b & 0x80)) {
			*out = v;
			return true;
		}
	}
	return false;
}

/* A field's key: false for field number 0 or one above 32 bits. */
static bool get_key(const uint8_t **p, const uint8_t *e, unsigned *field, unsigned *wire_type)
{
	uint64_t key;

	if (!get_varint(p, e, &key) || key > UINT32_MAX || key >> 3 == 0)
		return false;
	*field = (unsigned)(key >> 3);
	*wire_type = (unsigned)(key & 7);
	return true;
}

/* Past one value of wire type wire_type; false for groups (left to protobuf). */
static bool skip_value(const uint8_t **p, const uint8_t *e, unsigned wire_type)
{
	uint64_t v;

	switch (wire_type) {
	case WIRE_VARINT:
		return get_varint(p, e, &v);
	case WIRE_FIXED64:
		v = 8;
		break;
	case WIRE_FIXED32:
		v = 4;
		break;
	case WIRE_BYTES:
		if (!get_varint(p, e, &v))
			return false;
		break;
	default:
		return false;
	}
	if (v > (uint64_t)(e - *p))
		return false;
	*p += v;
	return true;
}

/* One AddressRange: the last start and end in it win, as in protobuf. */
static bool get_range(const uint8_t *p, const uint8_t *e, struct vmctl_segment *out)
{
	out->start = out->end = 0;
	while (p < e) {
		unsigned field, wire_type;

		if (!get_key(&p, e, &field, &wire_type))
			return false;
		if (field != RANGE_START && field != RANGE_END) {
			if (!skip_value(&p, e, wire_type))
				return false;
			continue;
		}
		if (wire_type != WIRE_VARINT || !get_varint(&p, e, field == RANGE_START ? &out->start : &out->end))
			return false;
	}
	return true;
}

int vmctl_request_ranges(const char *data, size_t len, struct vmctl_segment *out, size_t n)
{
	const uint8_t *p = (const uint8_t *)data, *e = p + len;
	size_t found = 0;

	while (p < e) {
		unsigned field, wire_type;
		uint64_t size;

		if (!get_key(&p, e, &field, &wire_type))
			return -ENOTSUP;
		if (field != REQUEST_RANGES) {
			if (!skip_value(&p, e, wire_type))
				return -ENOTSUP;
			continue;
		}
		if (wire_type != WIRE_BYTES || !get_varint(&p, e, &size) || size > (uint64_t)(e - p) || found == n)
			return -ENOTSUP;
		if (!get_range(p, p + size, &out[found]))
			return -ENOTSUP;
		found++;
		p += size;
	}
	return found == n ? 0 : -ENOTSUP;
}

void vmctl_ranges_bytes(const struct vmctl_segment *ranges, size_t n, uint64_t *low, uint64_t *high)
{
	unsigned __int128 sum = 0;

	for (size_t i = 0; i < n; i++)
		if (ranges[i].end > ranges[i].start)
			sum += ranges[i].end - ranges[i].start;
	*low = (uint64_t)sum;
	*high = (uint64_t)(sum >> 64);
}

/* ------------------------------------------------------------ checks */

struct ordered {
	uint64_t start;
	size_t index;
};

/* By start, then by position: the order of Python's stable sorted(). */
static int by_start(const void *a, const void *b)
{
	const struct ordered *x = a, *y = b;

	if (x->start != y->start)
		return x->start < y->start ? -1 : 1;
	return x->index < y->index ? -1 : x->index > y->index;
}

static int refuse(struct vmctl_range_fault *fault, int reason, size_t index)
{
	fault->reason = reason;
	fault->index = index;
	return reason;
}

int vmctl_ranges_check(const struct vmctl_segment *ranges, size_t n, uint64_t page_size,
		       struct vmctl_range_fault *fault)
{
	uint64_t mask = page_size - 1;
	bool sorted = true;
	struct ordered *order;

	memset(fault, 0, sizeof(*fault));
	for (size_t i = 0; i < n; i++) {
		uint64_t start = ranges[i].start, end = ranges[i].end;

		if ((start | end) & mask)
			return refuse(fault, VMCTL_RANGE_UNALIGNED, i);
		if (end == start)
			return refuse(fault, VMCTL_RANGE_EMPTY, i);
		if (end < start)
			return refuse(fault, VMCTL_RANGE_WRAPS, i);
		if (i && start < ranges[i - 1].start)
			sorted = false;
	}
	/* Each range against the next in address order. Requests usually come
	 * sorted already; only the others pay for a sort. */
	if (sorted) {
		for (size_t i = 1; i < n; i++)
			if (ranges[i].start < ranges[i - 1].end) {
				fault->before = i - 1;
				return refuse(fault, VMCTL_RANGE_OVERLAP, i);
			}
		return VMCTL_RANGES_OK;
	}
	order = malloc(n * sizeof(*order));
	if (!order)
		return -ENOMEM;
	for (size_t i = 0; i < n; i++) {
		order[i].start = ranges[i].start;
		order[i].index = i;
	}
	qsort(order, n, sizeof(*order), by_start);
	for (size_t k = 1; k < n; k++)
		if (ranges[order[k].index].start < ranges[order[k - 1].index].end) {
			fault->before = order[k - 1].index;
			refuse(fault, VMCTL_RANGE_OVERLAP, order[k].index);
			break;
		}
	free(order);
	return fault->reason;
}

/* ------------------------------------------------------------- plans */

struct vmctl_plan {
	size_t n;
	struct vmctl_range_outcome *ranges;
	size_t pieces, cap;
	struct vmctl_segment *piece;
	size_t *owner; /* the range each piece belongs to */
	uint64_t requested;
};

/* The layout records are little-endian ("<QQQQIIII"). */
static uint64_t record_start(const char *records, size_t i)
{
	uint64_t v;

	memcpy(&v, records + i * LAYOUT_RECORD_SIZE + LAYOUT_START_AT, sizeof(v));
	return le64toh(v);
}

static uint64_t record_end(const char *records, size_t i)
{
	uint64_t v;

	memcpy(&v, records + i * LAYOUT_RECORD_SIZE + LAYOUT_END_AT, sizeof(v));
	return le64toh(v);
}

static uint32_t record_kind(const char *records, size_t i)
{
	uint32_t v;

	memcpy(&v, records + i * LAYOUT_RECORD_SIZE + LAYOUT_KIND_AT, sizeof(v));
	return le32toh(v);
}

static uint64_t record_u64(const char *records, size_t i, size_t at)
{
	uint64_t v;

	memcpy(&v, records + i * LAYOUT_RECORD_SIZE + at, sizeof(v));
	return le64toh(v);
}

static uint32_t record_u32(const char *records, size_t i, size_t at)
{
	uint32_t v;

	memcpy(&v, records + i * LAYOUT_RECORD_SIZE + at, sizeof(v));
	return le32toh(v);
}

/* layout.Layout.first_at_or_after: bisect.bisect_right over the ends, step for step. */
static size_t first_ending_after(const char *records, size_t count, uint64_t address)
{
	size_t lo = 0, hi = count;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (address < record_end(records, mid))
			hi = mid;
		else
			lo = mid + 1;
	}
	return lo;
}

void vmctl_plan_free(struct vmctl_plan *plan)
{
	if (!plan)
		return;
	free(plan->ranges);
	free(plan->piece);
	free(plan->owner);
	free(plan);
}

static int add_piece(struct vmctl_plan *plan, size_t owner, uint64_t start, uint64_t end)
{
	if (plan->pieces == plan->cap) {
		size_t cap = plan->cap * 2;
		struct vmctl_segment *piece = realloc(plan->piece, cap * sizeof(*piece));

		if (!piece)
			return -ENOMEM;
		plan->piece = piece;
		size_t *owners = realloc(plan->owner, cap * sizeof(*owners));

		if (!owners)
			return -ENOMEM;
		plan->owner = owners;
		plan->cap = cap;
	}
	plan->piece[plan->pieces].start = start;
	plan->piece[plan->pieces].end = end;
	plan->owner[plan->pieces++] = owner;
	return 0;
}

/* advice.split_for_calls of one segment. */
static int add_segment(struct vmctl_plan *plan, size_t owner, uint64_t start, uint64_t end)
{
	while (end - start > MAX_RW_COUNT) {
		if (add_piece(plan, owner, start, start + MAX_RW_COUNT))
			return -ENOMEM;
		start += MAX_RW_COUNT;
	}
	return add_piece(plan, owner, start, end);
}

/* advice.plan_ranges for range i. */
static int plan_range(struct vmctl_plan *plan, size_t i, const char *records, size_t count, uint32_t admitted,
		      struct vmctl_range_fault *fault)
{
	struct vmctl_range_outcome *out = &plan->ranges[i];
	uint64_t cursor = out->start;
	size_t v = first_ending_after(records, count, cursor);

	while (cursor < out->end) {
		uint64_t piece_end;
		uint32_t kind;

		if (v >= count || record_start(records, v) > cursor) {
			fault->address = cursor;
			return refuse(fault, VMCTL_RANGE_UNMAPPED, i);
		}
		piece_end = record_end(records, v);
		if (piece_end > out->end)
			piece_end = out->end;
		kind = record_kind(records, v);
		if (kind < 32 && (admitted & (UINT32_C(1) << kind))) {
			if (add_segment(plan, i, cursor, piece_end))
				return -ENOMEM;
		} else {
			out->skipped += piece_end - cursor;
		}
		cursor = piece_end;
		v++;
	}
	return 0;
}

int vmctl_plan_new(const struct vmctl_segment *ranges, size_t n, const char *records, size_t record_count,
		   uint32_t admitted_kinds, struct vmctl_plan **out, struct vmctl_range_fault *fault)
{
	struct vmctl_plan *plan = calloc(1, sizeof(*plan));

	memset(fault, 0, sizeof(*fault));
	if (!plan)
		return -ENOMEM;
	plan->n = n;
	plan->cap = n + 16;
	plan->ranges = calloc(n ? n : 1, sizeof(*plan->ranges));
	plan->piece = malloc(plan->cap * sizeof(*plan->piece));
	plan->owner = malloc(plan->cap * sizeof(*plan->owner));
	if (!plan->ranges || !plan->piece || !plan->owner) {
		vmctl_plan_free(plan);
		return -ENOMEM;
	}
	for (size_t i = 0; i < n; i++) {
		int rc;

		plan->ranges[i].start = ranges[i].start;
		plan->ranges[i].end = ranges[i].end;
		plan->requested += ranges[i].end - ranges[i].start;
		rc = plan_range(plan, i, records, record_count, admitted_kinds, fault);
		if (rc) {
			vmctl_plan_free(plan);
			return rc;
		}
	}
	*out = plan;
	return 0;
}

const struct vmctl_range_outcome *vmctl_plan_outcomes(const struct vmctl_plan *plan)
{
	return plan->ranges;
}

const struct vmctl_segment *vmctl_plan_pieces(const struct vmctl_plan *plan, size_t *count, const size_t **owners)
{
	*count = plan->pieces;
	*owners = plan->owner;
	return plan->piece;
}

uint64_t vmctl_plan_requested(const struct vmctl_plan *plan)
{
	return plan->requested;
}

uint64_t vmctl_plan_advised(const struct vmctl_plan *plan)
{
	uint64_t sum = 0;

	for (size_t i = 0; i < plan->n; i++)
		sum += plan->ranges[i].advised;
	return sum;
}

size_t vmctl_plan_exclude(struct vmctl_plan *plan, const uint8_t *changed)
{
	size_t kept = 0, left_out = 0;

	for (size_t i = 0; i < plan->n; i++)
		if (changed[i]) {
			plan->ranges[i].changed = 1;
			plan->ranges[i].skipped = 0;
			left_out++;
		}
	for (size_t k = 0; k < plan->pieces; k++)
		if (!changed[plan->owner[k]]) {
			plan->piece[kept] = plan->piece[k];
			plan->owner[kept++] = plan->owner[k];
		}
	plan->pieces = kept;
	return left_out;
}

/* ------------------------------------------------- SCOPE_RANGES's check */

/* What one VMA is, for the comparison: the fields of a layout record that matter. */
struct seen_vma {
	uint64_t start, end, offset, inode;
	uint32_t dev_major, dev_minor, kind;
};

static void seen_from_record(const char *records, size_t i, struct seen_vma *out)
{
	out->start = record_start(records, i);
	out->end = record_end(records, i);
	out->offset = record_u64(records, i, LAYOUT_OFFSET_AT);
	out->inode = record_u64(records, i, LAYOUT_INODE_AT);
	out->dev_major = record_u32(records, i, LAYOUT_DEV_MAJOR_AT);
	out->dev_minor = record_u32(records, i, LAYOUT_DEV_MINOR_AT);
	out->kind = record_kind(records, i);
}

/* Where the live VMAs come from: PROCMAP_QUERY on an fd, or records read from maps. */
struct live_source {
	int maps_fd;
	const char *records;
	size_t count;
	char *name; /* VMA_NAME_MAX bytes, for PROCMAP_QUERY */
};

static bool starts_with(const char *s, size_t n, const char *prefix)
{
	size_t k = strlen(prefix);

	return n >= k && memcmp(s, prefix, k) == 0;
}

/* layout.vma_kind of what PROCMAP_QUERY answered; name_len counts no NUL. 0 when unknown. */
static uint32_t query_kind(const struct procmap_query *q, const char *name, size_t name_len, bool named)
{
	if (q->inode || q->dev_major || q->dev_minor)
		return KIND_FILE;
	if (!named)
		return 0;
	if (name_len && name[0] == '[' && !starts_with(name, name_len, "[heap]") &&
	    !starts_with(name, name_len, "[stack") && !starts_with(name, name_len, "[anon:"))
		return KIND_SPECIAL;
	return KIND_ANONYMOUS;
}

/* The live VMA covering address: 0 and *out; 1 when none covers it; -errno. */
static int live_vma(struct live_source *src, uint64_t address, struct seen_vma *out)
{
	struct procmap_query q;
	bool named = true;
	size_t name_len;

	if (!src->name) {
		size_t v = first_ending_after(src->records, src->count, address);

		if (v >= src->count || record_start(src->records, v) > address)
			return 1;
		seen_from_record(src->records, v, out);
		return 0;
	}
	for (;;) {
		memset(&q, 0, sizeof(q));
		q.size = sizeof(q);
		q.query_addr = address;
		if (named) {
			q.vma_name_addr = (uint64_t)(uintptr_t)src->name;
			q.vma_name_size = VMA_NAME_MAX;
		}
		if (ioctl(src->maps_fd, PROCMAP_QUERY, &q) == 0)
			break;
		if (errno == ENOENT)
			return 1;
		if (errno == ENAMETOOLONG && named) {
			named = false; /* a file's path longer than any name buffer: the kind needs none */
			continue;
		}
		if (errno == EINTR)
			continue;
		return -errno;
	}
	name_len = named && q.vma_name_size ? q.vma_name_size - 1 : 0;
	out->start = q.vma_start;
	out->end = q.vma_end;
	out->offset = q.vma_offset;
	out->inode = q.inode;
	out->dev_major = q.dev_major;
	out->dev_minor = q.dev_minor;
	out->kind = query_kind(&q, src->name, name_len, named);
	return 0;
}

/* Whether the same memory lies at address in both: kind, and for files the file and the offset there. */
static bool same_memory(const struct seen_vma *was, const struct seen_vma *now)
{
	if (!now->kind || was->kind != now->kind)
		return false;
	if (was->kind != KIND_FILE)
		return true;
	return was->dev_major == now->dev_major && was->dev_minor == now->dev_minor && was->inode == now->inode &&
	       was->offset - was->start == now->offset - now->start; /* modulo 2^64, as the file offset at any address */
}

/* 0: range r lies in the memory the snapshot saw there; 1: it changed; -errno. */
static int range_changed(struct live_source *src, const struct vmctl_segment *r, const char *records, size_t count)
{
	uint64_t cursor = r->start;
	size_t s = first_ending_after(records, count, cursor);

	while (cursor < r->end) {
		struct seen_vma was, now = { 0 };
		uint64_t stop;
		int rc;

		if (s >= count || record_start(records, s) > cursor)
			return 1; /* the snapshot had nothing here: the plan refuses such a range first */
		seen_from_record(records, s, &was);
		rc = live_vma(src, cursor, &now);
		if (rc)
			return rc;
		if (!same_memory(&was, &now))
			return 1;
		stop = was.end < now.end ? was.end : now.end;
		if (stop > r->end)
			stop = r->end;
		if (stop <= cursor)
			return 1; /* a kernel answer that makes no progress: trust nothing */
		cursor = stop;
		if (cursor >= was.end)
			s++;
	}
	return 0;
}

static long ranges_covering(struct live_source *src, const struct vmctl_segment *ranges, size_t n,
			    const char *records, size_t record_count, uint8_t *changed)
{
	long count = 0;

	for (size_t i = 0; i < n; i++) {
		int rc = range_changed(src, &ranges[i], records, record_count);

		if (rc < 0)
			return rc;
		changed[i] = (uint8_t)rc;
		count += rc;
	}
	return count;
}

long vmctl_ranges_covering(int maps_fd, const struct vmctl_segment *ranges, size_t n, const char *records,
			   size_t record_count, uint8_t *changed)
{
	struct live_source src = { .maps_fd = maps_fd };
	long rc;

	src.name = malloc(VMA_NAME_MAX);
	if (!src.name)
		return -ENOMEM;
	rc = ranges_covering(&src, ranges, n, records, record_count, changed);
	free(src.name);
	return rc;
}

long vmctl_ranges_covering_records(const struct vmctl_segment *ranges, size_t n, const char *records,
				   size_t record_count, const char *live, size_t live_count, uint8_t *changed)
{
	struct live_source src = { .maps_fd = -1, .records = live, .count = live_count };

	return ranges_covering(&src, ranges, n, records, record_count, changed);
}

void vmctl_plan_dry_run(struct vmctl_plan *plan)
{
	for (size_t i = 0; i < plan->n; i++)
		plan->ranges[i].advised = 0;
	for (size_t k = 0; k < plan->pieces; k++)
		plan->ranges[plan->owner[k]].advised += plan->piece[k].end - plan->piece[k].start;
}

long vmctl_plan_apply(struct vmctl_plan *plan, int pidfd, int advice, int *first_error)
{
	uint64_t *advised, total = 0;
	int *errors, first = 0;
	long calls;

	*first_error = 0;
	if (!plan->pieces)
		return 0;
	advised = calloc(plan->pieces, sizeof(*advised));
	errors = calloc(plan->pieces, sizeof(*errors));
	if (!advised || !errors) {
		free(advised);
		free(errors);
		return -ENOMEM;
	}
	calls = vmctl_advise(pidfd, plan->piece, plan->pieces, advice, advised, errors);
	if (calls >= 0) {
		for (size_t k = 0; k < plan->pieces; k++) {
			struct vmctl_range_outcome *r = &plan->ranges[plan->owner[k]];

			r->advised += advised[k];
			if (errors[k] && !r->err)
				r->err = errors[k];
			if (errors[k] && !first)
				first = errors[k];
			total += advised[k];
		}
		*first_error = total ? 0 : first;
	}
	free(advised);
	free(errors);
	return calls;
}

/* ------------------------------------------------------------- reply */

static size_t uint_field_len(uint64_t v)
{
	return v ? 1 + varint_len(v) : 0; /* every field number here takes a 1-byte key */
}

int vmctl_plan_encode(const struct vmctl_plan *plan, const char *prefix, size_t prefix_len,
		      char *const *errno_names, size_t name_count, char **out, size_t *out_len)
{
	size_t bound = prefix_len;
	char *buf, *w;

	/* A RangeResult's key and length in ranges, a key and at most 10
	 * bytes for each of its five numbers, and its error's key, length and
	 * name (from errno_names, or at most 11 digits). */
	for (size_t i = 0; i < plan->n; i++) {
		int err = plan->ranges[i].err;

		bound += 11 + 5 * 11 + 11 + 2 + sizeof(RANGE_CHANGED);
		if (err > 0 && (size_t)err < name_count && errno_names[err])
			bound += strlen(errno_names[err]);
		else
			bound += 11;
	}
	buf = malloc(bound ? bound : 1);
	if (!buf)
		return -ENOMEM;
	memcpy(buf, prefix, prefix_len);
	w = buf + prefix_len;
	for (size_t i = 0; i < plan->n; i++) {
		const struct vmctl_range_outcome *r = &plan->ranges[i];
		char digits[16];
		const char *name = NULL;
		size_t name_len = 0, body;

		if (r->err) {
			if (r->err > 0 && (size_t)r->err < name_count && errno_names[r->err]) {
				name = errno_names[r->err];
				name_len = strlen(name);
			} else {
				name_len = (size_t)snprintf(digits, sizeof(digits), "%d", r->err);
				name = digits;
			}
		}
		body = uint_field_len(r->start) + uint_field_len(r->end) + uint_field_len(r->advised) +
		       uint_field_len(r->skipped) + (name_len ? 1 + varint_len(name_len) + name_len : 0) +
		       uint_field_len((uint64_t)(int64_t)r->err) + /* int32: negative ones sign-extended */
		       (r->changed ? 2 + sizeof(RANGE_CHANGED) - 1 : 0);
		*w++ = RESPONSE_RANGES_TAG;
		w = put_varint(w, body);
		w = put_uint(w, RESULT_START, r->start);
		w = put_uint(w, RESULT_END, r->end);
		w = put_uint(w, RESULT_ADVISED, r->advised);
		w = put_uint(w, RESULT_SKIPPED, r->skipped);
		w = put_bytes(w, RESULT_ERROR, name, name_len);
		w = put_uint(w, RESULT_ERROR_NUMBER, (uint64_t)(int64_t)r->err);
		if (r->changed)
			w = put_bytes(w, RESULT_REASON, RANGE_CHANGED, sizeof(RANGE_CHANGED) - 1);
	}
	*out = buf;
	*out_len = (size_t)(w - buf);
	return 0;
}

/* ----------------------------------------------------- the call loop */

/* syscalls.batch_end */
static size_t batch_end(const uint64_t *lengths, size_t n, size_t first)
{
	size_t last = n - first < MAX_IOVECS ? n : first + MAX_IOVECS;
	uint64_t total = 0;
	size_t end = first;

	while (end < last && lengths[end] <= MAX_RW_COUNT - total) {
		total += lengths[end];
		end++;
	}
	return end > first ? end : first + 1;
}

/* syscalls.advise_segments, step for step (the reference documents why). */
long vmctl_advise(int pidfd, const struct vmctl_segment *segments, size_t n, int advice, uint64_t *advised,
		  int *errors)
{
	struct iovec *iov;
	uint64_t *lengths;
	long calls = 0;
	size_t i = 0;

	for (size_t k = 0; k < n; k++)
		if (segments[k].end < segments[k].start)
			return -EINVAL;
	iov = malloc((n ? n : 1) * sizeof(*iov));
	lengths = malloc((n ? n : 1) * sizeof(*lengths));
	if (!iov || !lengths) {
		free(iov);
		free(lengths);
		return -ENOMEM;
	}
	for (size_t k = 0; k < n; k++) {
		lengths[k] = segments[k].end - segments[k].start;
		iov[k].iov_base = (void *)(uintptr_t)segments[k].start;
		iov[k].iov_len = lengths[k];
	}
	while (i < n) {
		size_t stop = batch_end(lengths, n, i);
		long result = syscall(SYS_process_madvise, (long)pidfd, iov + i, stop - i, (long)advice, 0L);

		calls++;
		if (result < 0) {
			int err = errno;

			if (err == EINTR)
				continue;
			errors[i] = err;
			if (err == ESRCH || err == EPERM) {
				for (size_t k = i + 1; k < n; k++)
					errors[k] = err;
				break;
			}
			i++;
			continue;
		}
		/* Whole iovecs were advised; a remainder means the kernel
		 * stopped part way into one: advance it and resume there. */
		size_t left = (size_t)result;

		while (i < stop && left >= iov[i].iov_len) {
			left -= iov[i].iov_len;
			advised[i] += iov[i].iov_len;
			i++;
		}
		if (left && i < stop) {
			advised[i] += left;
			iov[i].iov_base = (char *)iov[i].iov_base + left;
			iov[i].iov_len -= left;
		}
	}
	free(iov);
	free(lengths);
	return calls;
}
