/*
 * vmctl_native.c: see vmctl_native.h. Every function here has a pure-Python
 * twin (pytable.py, syscalls.py) and must give the same answer; the tests
 * in tests/test_native_equivalence.py hold the two together.
 *
 * Parsing is strict: only text in the kernel's own format is accepted, and
 * anything else is -EINVAL (the Python reference raises on all of it too,
 * though it accepts a few spellings the kernel never prints, such as "+5").
 * Nothing here trusts its input: every number is range-checked, every
 * buffer is sized before it is written.
 */
#define _GNU_SOURCE

#include "vmctl_native.h"
#include "vmctl_internal.h"

#include <errno.h>
#include <linux/ioctl.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define PROCMAP_QUERY _IOWR('f', 17, struct procmap_query)
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#define PAGE_IS_PRESENT (1u << 3)
#define PAGE_IS_SWAPPED (1u << 4)
#define PAGE_IS_PFNZERO (1u << 5)
#define PAGE_IS_GUARD (1u << 8) /* Linux 6.15+ */
#define SCAN_VEC_LEN 4096 /* regions per PAGEMAP_SCAN call, as syscalls._SCAN_VEC_LEN */
#define BUILD_ID_MAX 64	  /* as syscalls.BUILD_ID_MAX */
#define KERNEL_HALF (UINT64_C(1) << 63)

/* vmctl_server.core.layout */
#define PERM_READ 1u
#define PERM_WRITE 2u
#define PERM_EXEC 4u
#define PERM_SHARED 8u

/*
 * Field numbers of vmctl.v1.Vma (tests/test_words.py checks them against the
 * proto). The smaps parser names what a line fills by the field that carries
 * it, so the encoder needs no second table.
 */
enum {
	F_UNKNOWN = 0,
	F_START = 1,
	F_END = 2,
	F_PERMS = 3,
	F_OFFSET = 4,
	F_DEV_MAJOR = 5,
	F_DEV_MINOR = 6,
	F_INODE = 7,
	F_PATH = 8,
	F_KIND = 9,
	F_RSS = 10,
	F_SWAP = 11,
	F_PSS = 12, /* 12..14 and 16..31: accounting values, in bytes */
	F_REFERENCED = 13,
	F_ANONYMOUS = 14,
	F_BUILD_ID = 15,
	F_PSS_DIRTY = 16,
	F_SHARED_CLEAN = 17,
	F_SHARED_DIRTY = 18,
	F_PRIVATE_CLEAN = 19,
	F_PRIVATE_DIRTY = 20,
	F_KSM = 21,
	F_LAZY_FREE = 22,
	F_ANON_HUGE_PAGES = 23,
	F_SHMEM_PMD_MAPPED = 24,
	F_FILE_PMD_MAPPED = 25,
	F_SHARED_HUGETLB = 26,
	F_PRIVATE_HUGETLB = 27,
	F_SWAP_PSS = 28,
	F_LOCKED = 29,
	F_KERNEL_PAGE_SIZE = 30,
	F_MMU_PAGE_SIZE = 31,
	F_THP_ELIGIBLE = 32,
	F_VM_FLAGS = 33,
	F_ACCESSED = 34, /* Referenced again, read after a clear_refs (ATTR_ACCESS) */
	F_RAW_PATH = 40,
};
#define ACCT_VALUES 19 /* fields 12..14 and 16..31 */
#define VMAS_TAG 0x22 /* GetVmaInfoResponse.vmas: field 4, length-delimited */

struct vmctl_vma {
	uint64_t start, end, offset, inode;
	uint64_t rss, swap;
	size_t path_off, path_len; /* the raw path bytes, in table->text */
	size_t build_id_off;	   /* in table->build_ids */
	uint32_t dev_major, dev_minor;
	uint8_t perm_flags, kind, build_id_len;
	bool path_utf8;
	char perms[4];
};

/* What only smaps gives, kept apart so maps tables do not carry it. */
struct vmctl_acct {
	uint64_t value[ACCT_VALUES];
	size_t vm_flags_off, vm_flags_len; /* in table->text */
	bool thp_eligible;
};

struct vmctl_table {
	size_t len, cap;
	struct vmctl_vma *vmas;
	struct vmctl_acct *acct; /* NULL for a maps table */
	/* Paths and VmFlags values, copied from the input. */
	char *text;
	size_t text_len, text_cap;
	uint8_t *build_ids; /* BUILD_ID_MAX bytes per file VMA; NULL until filled */
};

static size_t acct_index(int field)
{
	return (size_t)(field < F_BUILD_ID ? field - F_PSS : field - F_PSS_DIRTY + 3);
}

/* ---------------------------------------------------------------- numbers */

/* bytes.split() and bytes.strip() whitespace. */
static bool is_py_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

/* The first byte at or after p that is not ' ', or e; 8 bytes at a time. */
static const char *skip_spaces(const char *p, const char *e)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
	while (e - p >= 8) {
		uint64_t word;

		memcpy(&word, p, 8);
		word ^= UINT64_C(0x2020202020202020); /* a space becomes a zero byte */
		if (word)
			return p + __builtin_ctzll(word) / 8; /* the lowest address is the lowest byte */
		p += 8;
	}
#endif
	while (p < e && *p == ' ')
		p++;
	return p;
}

static bool is_lower_hex(char c)
{
	return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
}

/* 1 + the value of each byte as a digit (to base 16); 0 for a byte that is none. */
static const uint8_t DIGIT_PLUS_1[256] = {
	['0'] = 1,  ['1'] = 2,	['2'] = 3,  ['3'] = 4,	['4'] = 5,  ['5'] = 6,	['6'] = 7,  ['7'] = 8,
	['8'] = 9,  ['9'] = 10, ['a'] = 11, ['b'] = 12, ['c'] = 13, ['d'] = 14, ['e'] = 15, ['f'] = 16,
	['A'] = 11, ['B'] = 12, ['C'] = 13, ['D'] = 14, ['E'] = 15, ['F'] = 16,
};

static unsigned digit_value(char c, unsigned base)
{
	unsigned d = (unsigned)DIGIT_PLUS_1[(uint8_t)c] - 1; /* UINT_MAX for no digit */

	return d < base ? d : base;
}

/*
 * [p, e) as one unsigned number in base 10 or 16, at most max. The hot path
 * of every parser here: overflow is caught by the multiply itself rather
 * than by a division per digit.
 */
static bool parse_uint(const char *p, const char *e, unsigned base, uint64_t max, uint64_t *out)
{
	uint64_t v = 0;

	if (p == e)
		return false;
	for (; p < e; p++) {
		unsigned d = digit_value(*p, base);

		if (d == base || __builtin_mul_overflow(v, base, &v) || __builtin_add_overflow(v, d, &v))
			return false;
	}
	if (v > max)
		return false;
	*out = v;
	return true;
}

/* ------------------------------------------------------------------ UTF-8 */

static bool is_cont(uint8_t c)
{
	return (c & 0xC0) == 0x80;
}

/*
 * Length of the well-formed UTF-8 sequence at s (1..4), or 0: CPython's
 * strict decoder, which rejects overlongs, surrogates and anything above
 * U+10FFFF (Unicode table 3-7).
 */
static size_t utf8_char(const uint8_t *s, size_t n)
{
	uint8_t c = s[0];

	if (c < 0x80)
		return 1;
	if (c >= 0xC2 && c <= 0xDF)
		return n >= 2 && is_cont(s[1]) ? 2 : 0;
	if (c >= 0xE0 && c <= 0xEF) {
		uint8_t lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;

		return n >= 3 && s[1] >= lo && s[1] <= hi && is_cont(s[2]) ? 3 : 0;
	}
	if (c >= 0xF0 && c <= 0xF4) {
		uint8_t lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;

		return n >= 4 && s[1] >= lo && s[1] <= hi && is_cont(s[2]) && is_cont(s[3]) ? 4 : 0;
	}
	return 0;
}

static bool utf8_valid(const uint8_t *s, size_t n)
{
	size_t i = 0;

	while (i < n) {
		/* Paths are nearly always ASCII: skip it 8 bytes at a time. */
		while (n - i >= 8) {
			uint64_t word;

			memcpy(&word, s + i, 8);
			if (word & UINT64_C(0x8080808080808080))
				break;
			i += 8;
		}
		if (i == n)
			break;
		size_t k = utf8_char(s + i, n - i);

		if (!k)
			return false;
		i += k;
	}
	return true;
}

/*
 * decode('utf-8', 'backslashreplace'): each byte outside a well-formed
 * sequence becomes \xNN. CPython escapes a whole maximal invalid subpart at
 * once, but such a subpart is a lead byte and continuation bytes, none of
 * which can start a sequence, so escaping byte by byte gives the same text.
 * With out NULL, only the length is computed.
 */
static size_t utf8_escape(const uint8_t *s, size_t n, char *out)
{
	static const char hex[] = "0123456789abcdef";
	size_t i = 0, w = 0;

	while (i < n) {
		size_t k = utf8_char(s + i, n - i);

		if (k) {
			if (out)
				memcpy(out + w, s + i, k);
			w += k;
			i += k;
			continue;
		}
		if (out) {
			out[w] = '\\';
			out[w + 1] = 'x';
			out[w + 2] = hex[s[i] >> 4];
			out[w + 3] = hex[s[i] & 15];
		}
		w += 4;
		i++;
	}
	return w;
}

/* ---------------------------------------------------------------- parsing */

static void table_free(struct vmctl_table *t)
{
	if (!t)
		return;
	free(t->vmas);
	free(t->acct);
	free(t->text);
	free(t->build_ids);
	free(t);
}

void vmctl_table_free(struct vmctl_table *table)
{
	table_free(table);
}

size_t vmctl_table_len(const struct vmctl_table *table)
{
	return table->len;
}

static struct vmctl_table *table_new(size_t text_cap, size_t cap, bool smaps)
{
	struct vmctl_table *t = calloc(1, sizeof(*t));

	if (!t)
		return NULL;
	t->cap = cap ? cap : 1;
	t->vmas = malloc(t->cap * sizeof(*t->vmas));
	t->acct = smaps ? malloc(t->cap * sizeof(*t->acct)) : NULL;
	t->text_cap = text_cap ? text_cap : 1;
	t->text = malloc(t->text_cap);
	if (!t->vmas || (smaps && !t->acct) || !t->text) {
		table_free(t);
		return NULL;
	}
	return t;
}

static int table_grow(struct vmctl_table *t)
{
	size_t cap = t->cap * 2;
	struct vmctl_vma *vmas;

	if (cap > SIZE_MAX / sizeof(struct vmctl_acct))
		return -ENOMEM;
	vmas = realloc(t->vmas, cap * sizeof(*vmas));
	if (!vmas)
		return -ENOMEM;
	t->vmas = vmas;
	if (t->acct) {
		struct vmctl_acct *acct = realloc(t->acct, cap * sizeof(*acct));

		if (!acct)
			return -ENOMEM;
		t->acct = acct;
	}
	t->cap = cap;
	return 0;
}

/* Copy n bytes to the table's text; *off is where they landed. 0 or -ENOMEM. */
static int text_append(struct vmctl_table *t, const char *s, size_t n, size_t *off)
{
	if (n > t->text_cap - t->text_len) {
		size_t cap = t->text_len + n > t->text_cap * 2 ? t->text_len + n : t->text_cap * 2;
		char *text = realloc(t->text, cap);

		if (!text)
			return -ENOMEM;
		t->text = text;
		t->text_cap = cap;
	}
	*off = t->text_len;
	memcpy(t->text + *off, s, n);
	t->text_len += n;
	return 0;
}

/* The first byte at or after p that is c, or e. */
static const char *find(const char *p, const char *e, char c)
{
	const char *hit = memchr(p, c, (size_t)(e - p));

	return hit ? hit : e;
}

static bool has_prefix(const char *s, size_t n, const char *prefix)
{
	size_t k = strlen(prefix);

	return n >= k && memcmp(s, prefix, k) == 0;
}

/* layout.vma_kind */
static uint8_t vma_kind(const struct vmctl_vma *v, const char *path)
{
	if (v->inode || v->dev_major || v->dev_minor)
		return KIND_FILE;
	if (v->path_len && path[0] == '[' && !has_prefix(path, v->path_len, "[heap]") &&
	    !has_prefix(path, v->path_len, "[stack") && !has_prefix(path, v->path_len, "[anon:"))
		return KIND_SPECIAL;
	return KIND_ANONYMOUS;
}

/*
 * One maps line: "START-END PERMS OFFSET MAJOR:MINOR INODE[ PATH]", split on
 * single spaces into at most six parts like pytable.parse_header, the path
 * being the sixth part without its leading spaces.
 */
static int parse_header(struct vmctl_table *t, const char *p, const char *e)
{
	const char *part[6], *stop[6], *dash, *colon;
	struct vmctl_vma *v = &t->vmas[t->len];
	uint64_t major, minor;
	int n = 0;

	part[0] = p;
	for (;;) {
		const char *sp = n < 5 ? find(part[n], e, ' ') : e;

		stop[n] = sp;
		n++;
		if (sp == e)
			break;
		part[n] = sp + 1;
	}
	if (n < 5)
		return -EINVAL;

	dash = find(part[0], stop[0], '-');
	if (dash == stop[0] || !parse_uint(part[0], dash, 16, UINT64_MAX, &v->start) ||
	    !parse_uint(dash + 1, stop[0], 16, UINT64_MAX, &v->end))
		return -EINVAL;

	if (stop[1] - part[1] != 4)
		return -EINVAL;
	for (int i = 0; i < 4; i++)
		if ((unsigned char)part[1][i] >= 0x80)
			return -EINVAL;
	memcpy(v->perms, part[1], 4);
	v->perm_flags = (uint8_t)((v->perms[0] == 'r' ? PERM_READ : 0) | (v->perms[1] == 'w' ? PERM_WRITE : 0) |
				  (v->perms[2] == 'x' ? PERM_EXEC : 0) | (v->perms[3] == 's' ? PERM_SHARED : 0));

	if (!parse_uint(part[2], stop[2], 16, UINT64_MAX, &v->offset))
		return -EINVAL;
	colon = find(part[3], stop[3], ':');
	if (colon == stop[3] || !parse_uint(part[3], colon, 16, UINT32_MAX, &major) ||
	    !parse_uint(colon + 1, stop[3], 16, UINT32_MAX, &minor))
		return -EINVAL;
	v->dev_major = (uint32_t)major;
	v->dev_minor = (uint32_t)minor;
	if (!parse_uint(part[4], stop[4], 10, UINT64_MAX, &v->inode))
		return -EINVAL;

	if (n == 6) {
		const char *path = part[5];

		while (path < e && *path == ' ')
			path++;
		v->path_len = (size_t)(e - path);
		if (text_append(t, path, v->path_len, &v->path_off))
			return -ENOMEM;
	} else {
		v->path_len = 0;
		v->path_off = t->text_len;
	}
	v->path_utf8 = utf8_valid((const uint8_t *)t->text + v->path_off, v->path_len);
	v->kind = vma_kind(v, t->text + v->path_off);
	v->rss = v->swap = 0;
	v->build_id_len = 0;
	v->build_id_off = 0;
	if (t->acct)
		memset(&t->acct[t->len], 0, sizeof(t->acct[t->len]));
	t->len++;
	return 0;
}

/* pytable.SMAPS_KB_FIELDS, THPeligible and VmFlags, by the Vma field each fills. */
static int smaps_field(const char *k, size_t n)
{
#define IS(name) (n == sizeof(name) - 1 && memcmp(k, name, sizeof(name) - 1) == 0)
	switch (n) {
	case 3:
		return IS("Rss") ? F_RSS : IS("Pss") ? F_PSS : IS("KSM") ? F_KSM : F_UNKNOWN;
	case 4:
		return IS("Swap") ? F_SWAP : F_UNKNOWN;
	case 6:
		return IS("Locked") ? F_LOCKED : F_UNKNOWN;
	case 7:
		return IS("SwapPss") ? F_SWAP_PSS : IS("VmFlags") ? F_VM_FLAGS : F_UNKNOWN;
	case 8:
		return IS("LazyFree") ? F_LAZY_FREE : F_UNKNOWN;
	case 9:
		return IS("Anonymous") ? F_ANONYMOUS : IS("Pss_Dirty") ? F_PSS_DIRTY : F_UNKNOWN;
	case 10:
		return IS("Referenced") ? F_REFERENCED : F_UNKNOWN;
	case 11:
		return IS("MMUPageSize") ? F_MMU_PAGE_SIZE : IS("THPeligible") ? F_THP_ELIGIBLE : F_UNKNOWN;
	case 12:
		return IS("Shared_Clean") ? F_SHARED_CLEAN : IS("Shared_Dirty") ? F_SHARED_DIRTY : F_UNKNOWN;
	case 13:
		if (IS("Private_Clean"))
			return F_PRIVATE_CLEAN;
		if (IS("Private_Dirty"))
			return F_PRIVATE_DIRTY;
		if (IS("AnonHugePages"))
			return F_ANON_HUGE_PAGES;
		return IS("FilePmdMapped") ? F_FILE_PMD_MAPPED : F_UNKNOWN;
	case 14:
		if (IS("ShmemPmdMapped"))
			return F_SHMEM_PMD_MAPPED;
		if (IS("Shared_Hugetlb"))
			return F_SHARED_HUGETLB;
		return IS("KernelPageSize") ? F_KERNEL_PAGE_SIZE : F_UNKNOWN;
	case 15:
		return IS("Private_Hugetlb") ? F_PRIVATE_HUGETLB : F_UNKNOWN;
	default:
		return F_UNKNOWN;
	}
#undef IS
}

/*
 * One smaps line that is not a VMA header: "Key: value". The value of a key
 * the reference knows is checked even before the first header, where the
 * reference evaluates it too (into a row it then drops).
 */
static int parse_smaps_line(struct vmctl_table *t, const char *p, const char *e)
{
	const char *colon = find(p, e, ':');
	const char *value = colon < e ? colon + 1 : e;
	struct vmctl_acct *acct = t->len ? &t->acct[t->len - 1] : NULL;
	int field = smaps_field(p, (size_t)(colon - p));

	if (field == F_UNKNOWN)
		return 0;
	/* bytes.strip(); the kernel pads values with runs of spaces */
	value = skip_spaces(value, e);
	while (value < e && is_py_space(*value))
		value++;
	while (e > value && is_py_space(e[-1]))
		e--;
	if (field == F_THP_ELIGIBLE) {
		if (acct)
			acct->thp_eligible = e - value == 1 && *value == '1';
		return 0;
	}
	if (field == F_VM_FLAGS) {
		for (const char *c = value; c < e; c++)
			if ((unsigned char)*c >= 0x80)
				return -EINVAL;
		if (acct) {
			acct->vm_flags_len = (size_t)(e - value);
			if (text_append(t, value, acct->vm_flags_len, &acct->vm_flags_off))
				return -ENOMEM;
		}
		return 0;
	}
	/* int(value.split()[0]) * 1024, in bytes */
	const char *token_end = value;
	uint64_t kb;

	while (token_end < e && !is_py_space(*token_end))
		token_end++;
	if (!parse_uint(value, token_end, 10, UINT64_MAX / 1024, &kb))
		return -EINVAL;
	if (!acct)
		return 0;
	if (field == F_RSS)
		t->vmas[t->len - 1].rss = kb * 1024;
	else if (field == F_SWAP)
		t->vmas[t->len - 1].swap = kb * 1024;
	else
		acct->value[acct_index(field)] = kb * 1024;
	return 0;
}

/* One line, without its newline: a VMA header, or (smaps) a "Key: value". */
static int parse_line(struct vmctl_table *t, bool smaps, const char *p, const char *eol)
{
	if (eol == p)
		return 0;
	if (!smaps || is_lower_hex(*p)) {
		if (t->len == t->cap) {
			int err = table_grow(t);

			if (err)
				return err;
		}
		return parse_header(t, p, eol);
	}
	return parse_smaps_line(t, p, eol);
}

/*
 * The common smaps line, "Key:<spaces>DIGITS kB\n" (a key smaps_field counts
 * in kB, or one it does not know and skips), taken in one pass: no memchr for the newline or the colon,
 * no strip. Returns the start of the next line, or NULL for any other line
 * (a header, THPeligible, VmFlags, anything unusual, a value too large),
 * which parse_line then takes as before: the answer is the same
 * either way, this is only quicker for the lines that are most of smaps.
 */
static const char *fast_kb_line(struct vmctl_table *t, const char *p, const char *end)
{
	const char *q = p, *limit = end - p > 16 ? p + 16 : end;
	uint64_t kb = 0;
	int field;

	if (p == end || is_lower_hex(*p))
		return NULL;
	while (q < limit && *q != ':' && *q != '\n')
		q++;
	if (q == limit || *q != ':')
		return NULL;
	field = smaps_field(p, (size_t)(q - p));
	if (field == F_THP_ELIGIBLE || field == F_VM_FLAGS)
		return NULL;
	q = skip_spaces(q + 1, end);
	if (q == end || (unsigned)(*q - '0') > 9)
		return NULL;
	for (; q < end && (unsigned)(*q - '0') <= 9; q++)
		if (__builtin_mul_overflow(kb, 10, &kb) || __builtin_add_overflow(kb, (unsigned)(*q - '0'), &kb))
			return NULL;
	if (kb > UINT64_MAX / 1024 || end - q < 4 || memcmp(q, " kB\n", 4) != 0)
		return NULL;
	if (t->len && field != F_UNKNOWN) { /* an unknown key's line is skipped, as parse_line skips it */
		if (field == F_RSS)
			t->vmas[t->len - 1].rss = kb * 1024;
		else if (field == F_SWAP)
			t->vmas[t->len - 1].swap = kb * 1024;
		else
			t->acct[t->len - 1].value[acct_index(field)] = kb * 1024;
	}
	return q + 4;
}

/*
 * Every line that ends in [p, end) with a newline, and, when final, the
 * unterminated rest as the last line. *used is how far the lines went;
 * *line counts them, so it names the bad one on -EINVAL.
 */
static int parse_lines(struct vmctl_table *t, bool smaps, const char *p, const char *end, bool final, size_t *used,
		       size_t *line)
{
	const char *start = p;
	int err = 0;

	for (;;) {
		const char *eol, *next;

		if (smaps && (next = fast_kb_line(t, p, end))) {
			++*line;
			p = next;
			continue;
		}
		eol = memchr(p, '\n', (size_t)(end - p));
		if (!eol) {
			if (final && p < end) {
				++*line;
				err = parse_line(t, smaps, p, end);
				p = end;
			}
			break;
		}
		++*line;
		err = parse_line(t, smaps, p, eol);
		if (err)
			break;
		p = eol + 1;
	}
	*used = (size_t)(p - start);
	return err;
}

static int finish(struct vmctl_table *t, int err, size_t line, struct vmctl_table **out, size_t *bad_line)
{
	if (err) {
		*bad_line = err == -EINVAL ? line : 0;
		table_free(t);
		return err;
	}
	*bad_line = 0;
	*out = t;
	return 0;
}

static int parse(const char *data, size_t len, bool smaps, struct vmctl_table **out, size_t *bad_line)
{
	struct vmctl_table *t;
	size_t cap = 1, line = 0, used;
	int err;

	/* maps has a line per VMA: count them and never grow. */
	if (!smaps)
		for (const char *q = data, *end = data + len; (q = memchr(q, '\n', (size_t)(end - q))); q++)
			cap++;
	else
		cap = len / 512 + 16;
	/* Every path and VmFlags value is a distinct slice of the input. */
	t = table_new(len, cap, smaps);
	if (!t)
		return -ENOMEM;
	err = parse_lines(t, smaps, data, data + len, true, &used, &line);
	return finish(t, err, line, out, bad_line);
}

int vmctl_table_from_maps(const char *data, size_t len, struct vmctl_table **out, size_t *bad_line)
{
	return parse(data, len, false, out, bad_line);
}

int vmctl_table_from_smaps(const char *data, size_t len, struct vmctl_table **out, size_t *bad_line)
{
	return parse(data, len, true, out, bad_line);
}

#define READ_BUFFER (64u << 10)

int vmctl_table_read(int fd, int smaps, size_t chunk, struct vmctl_table **out, size_t *bad_line)
{
	/* The kernel hands out /proc text one seq_file buffer (a page or a
	 * record) per read; parse each piece while it is hot in the cache. */
	size_t cap = READ_BUFFER, have = 0, line = 0;
	struct vmctl_table *t = table_new(READ_BUFFER, 256, smaps);
	char *buf = malloc(cap);
	int err = 0, read_errno = 0;

	if (!t || !buf) {
		free(buf);
		table_free(t);
		return -ENOMEM;
	}
	for (;;) {
		size_t want = cap - have, used;
		ssize_t n;

		if (!want) {
			/* One line longer than the buffer. */
			char *bigger = realloc(buf, cap * 2);

			if (!bigger) {
				err = -ENOMEM;
				break;
			}
			buf = bigger;
			cap *= 2;
			continue;
		}
		n = read(fd, buf + have, chunk && chunk < want ? chunk : want);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			read_errno = errno;
			break;
		}
		have += (size_t)n;
		err = parse_lines(t, smaps, buf, buf + have, n == 0, &used, &line);
		if (err || n == 0)
			break;
		memmove(buf, buf + used, have - used);
		have -= used;
	}
	free(buf);
	if (read_errno) {
		table_free(t);
		*bad_line = 0; /* no line was bad */
		return -read_errno;
	}
	return finish(t, err, line, out, bad_line);
}

/* ----------------------------------------------------------------- layout */

static char *put_le(char *p, uint64_t v, int bytes)
{
	for (int i = 0; i < bytes; i++)
		*p++ = (char)(v >> (8 * i));
	return p;
}

void vmctl_table_layout(const struct vmctl_table *table, char *out)
{
	for (size_t i = 0; i < table->len; i++) {
		const struct vmctl_vma *v = &table->vmas[i];

		/* LAYOUT_RECORD "<QQQQIIII" */
		out = put_le(out, v->start, 8);
		out = put_le(out, v->end, 8);
		out = put_le(out, v->offset, 8);
		out = put_le(out, v->inode, 8);
		out = put_le(out, v->dev_major, 4);
		out = put_le(out, v->dev_minor, 4);
		out = put_le(out, v->perm_flags, 4);
		out = put_le(out, v->kind, 4);
	}
}

/* ------------------------------------------------------------- residency */

/* The first VMA at or after i that PAGEMAP_SCAN can walk (below KERNEL_HALF). */
static size_t next_scanned(const struct vmctl_table *t, size_t i)
{
	while (i < t->len && t->vmas[i].end > KERNEL_HALF)
		i++;
	return i;
}

/*
 * pytable._attribute_runs over the scanned VMAs, one batch of runs at a
 * time; *cursor carries its index i between batches, as the runs come in
 * address order.
 */
static void attribute_runs(struct vmctl_table *t, const struct page_region *runs, int count, size_t *cursor)
{
	size_t i = *cursor;

	for (int r = 0; r < count; r++) {
		uint64_t run_start = runs[r].start, run_end = runs[r].end;

		while (i < t->len && t->vmas[i].end <= run_start)
			i = next_scanned(t, i + 1);
		for (size_t j = i; j < t->len && t->vmas[j].start < run_end; j = next_scanned(t, j + 1)) {
			struct vmctl_vma *v = &t->vmas[j];
			uint64_t lo = run_start > v->start ? run_start : v->start;
			uint64_t hi = run_end < v->end ? run_end : v->end;

			if (hi > lo) {
				if (runs[r].categories & PAGE_IS_PRESENT)
					v->rss += hi - lo;
				else
					v->swap += hi - lo;
			}
		}
	}
	*cursor = i;
}

int vmctl_table_fill_residency(struct vmctl_table *table, int pagemap_fd)
{
	struct vmctl_table *t = table;
	size_t first = next_scanned(t, 0), last = first, cursor = first;
	struct page_region *vec;
	struct pm_scan_arg arg;
	uint64_t start, end;

	for (size_t i = 0; i < t->len; i++)
		t->vmas[i].rss = t->vmas[i].swap = 0;
	if (first == t->len)
		return 0;
	for (size_t i = first; i < t->len; i = next_scanned(t, i + 1))
		last = i;
	start = t->vmas[first].start;
	end = t->vmas[last].end;

	vec = malloc(SCAN_VEC_LEN * sizeof(*vec));
	if (!vec)
		return -ENOMEM;
	/* The same request as syscalls.pagemap_scan_residency. */
	memset(&arg, 0, sizeof(arg));
	arg.size = sizeof(arg);
	arg.vec = (uint64_t)(uintptr_t)vec;
	arg.vec_len = SCAN_VEC_LEN;
	arg.category_inverted = PAGE_IS_PFNZERO | PAGE_IS_GUARD;
	arg.category_mask = PAGE_IS_PFNZERO | PAGE_IS_GUARD;
	arg.category_anyof_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED;
	arg.return_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED;
	while (start < end) {
		int count;

		arg.start = start;
		arg.end = end;
		count = ioctl(pagemap_fd, PAGEMAP_SCAN, &arg);
		if (count < 0) {
			int err = errno;

			if (err == EINTR)
				continue;
			if (err == EINVAL && (arg.category_mask & PAGE_IS_GUARD)) {
				/* no PAGE_IS_GUARD in this kernel: see syscalls.py */
				arg.category_inverted = arg.category_mask = PAGE_IS_PFNZERO;
				continue;
			}
			free(vec);
			return -err;
		}
		attribute_runs(t, vec, count, &cursor);
		/* Done unless the vector filled: walk_end can be stale (see
		 * syscalls.pagemap_scan_residency). */
		if (count < SCAN_VEC_LEN)
			break;
		start = arg.walk_end > vec[count - 1].end ? arg.walk_end : vec[count - 1].end;
	}
	free(vec);
	return 0;
}

/* ------------------------------------------------------------- build ids */

int vmctl_table_fill_build_ids(struct vmctl_table *table, int maps_fd)
{
	struct vmctl_table *t = table;
	size_t files = 0, used = 0;

	for (size_t i = 0; i < t->len; i++) {
		t->vmas[i].build_id_len = 0;
		files += t->vmas[i].kind == KIND_FILE;
	}
	free(t->build_ids);
	t->build_ids = malloc(files ? files * BUILD_ID_MAX : 1);
	if (!t->build_ids)
		return -ENOMEM;
	for (size_t i = 0; i < t->len; i++) {
		struct vmctl_vma *v = &t->vmas[i];
		struct procmap_query q;

		if (v->kind != KIND_FILE)
			continue;
		memset(&q, 0, sizeof(q));
		q.size = sizeof(q);
		q.query_addr = v->start;
		q.build_id_addr = (uint64_t)(uintptr_t)(t->build_ids + used);
		q.build_id_size = BUILD_ID_MAX;
		if (ioctl(maps_fd, PROCMAP_QUERY, &q) < 0) {
			if (errno == ENOENT || errno == ESRCH)
				continue; /* unmapped since the layout was read: nothing to report */
			return -errno;
		}
		v->build_id_off = used;
		v->build_id_len = (uint8_t)q.build_id_size;
		used += q.build_id_size;
	}
	return 0;
}

/* --------------------------------------------------------------- protobuf */

/* Most bytes one Vma can take, with its tag and length in vmas. */
static size_t vma_bound(const struct vmctl_table *t, size_t i)
{
	/* 11 for the tag and length in vmas, 12 per number (2-byte key,
	 * 10-byte varint), 23 per string's key and length, ... */
	size_t n = 11 + 40 * 12 + 5 * 23 + 4 + BUILD_ID_MAX;

	/* ... the path, escaped (4 bytes per byte at most) and raw, ... */
	n += 5 * t->vmas[i].path_len;
	/* ... and VmFlags. */
	if (t->acct)
		n += t->acct[i].vm_flags_len;
	return n;
}

/*
 * The fields of one Vma in field-number order, as the protobuf library
 * writes them (PyVmaTable.encode is the reference).
 */
static char *put_vma(const struct vmctl_table *t, size_t i, uint32_t mask, char *p)
{
	const struct vmctl_vma *v = &t->vmas[i];
	const struct vmctl_acct *a = t->acct ? &t->acct[i] : NULL;
	const char *path = t->text + v->path_off;

	p = put_uint(p, F_START, v->start);
	p = put_uint(p, F_END, v->end);
	p = put_bytes(p, F_PERMS, v->perms, 4);
	p = put_uint(p, F_OFFSET, v->offset);
	p = put_uint(p, F_DEV_MAJOR, v->dev_major);
	p = put_uint(p, F_DEV_MINOR, v->dev_minor);
	p = put_uint(p, F_INODE, v->inode);
	if (v->path_utf8) {
		p = put_bytes(p, F_PATH, path, v->path_len);
	} else {
		size_t n = utf8_escape((const uint8_t *)path, v->path_len, NULL);

		p = put_varint(p, F_PATH << 3 | WIRE_BYTES);
		p = put_varint(p, n);
		p += utf8_escape((const uint8_t *)path, v->path_len, p);
	}
	p = put_uint(p, F_KIND, v->kind);
	if (mask & ATTR_RESIDENCY) {
		p = put_uint(p, F_RSS, v->rss);
		p = put_uint(p, F_SWAP, v->swap);
	}
	if (a && (mask & ATTR_ACCOUNTING))
		for (int f = F_PSS; f < F_BUILD_ID; f++)
			p = put_uint(p, (unsigned)f, a->value[acct_index(f)]);
	if (t->build_ids && (mask & ATTR_BUILD_ID))
		p = put_bytes(p, F_BUILD_ID, t->build_ids + v->build_id_off, v->build_id_len);
	if (a && (mask & ATTR_ACCOUNTING)) {
		for (int f = F_PSS_DIRTY; f <= F_MMU_PAGE_SIZE; f++)
			p = put_uint(p, (unsigned)f, a->value[acct_index(f)]);
		p = put_uint(p, F_THP_ELIGIBLE, a->thp_eligible);
		p = put_bytes(p, F_VM_FLAGS, t->text + a->vm_flags_off, a->vm_flags_len);
	}
	if (a && (mask & ATTR_ACCESS))
		p = put_uint(p, F_ACCESSED, a->value[acct_index(F_REFERENCED)]);
	/* raw_path only when path had to be escaped */
	if (!v->path_utf8)
		p = put_bytes(p, F_RAW_PATH, path, v->path_len);
	return p;
}

/* Most bytes the wire form of every Vma can take. */
static size_t table_bound(const struct vmctl_table *table)
{
	size_t bound = 0;

	for (size_t i = 0; i < table->len; i++)
		bound += vma_bound(table, i);
	return bound;
}

/*
 * Write VMA i as one entry of `repeated Vma vmas = 4` at w; returns the
 * end of what it wrote. The Vma is written after a 2-byte length (most are
 * 128..16383 bytes), then moved if its length takes another size: protobuf
 * lengths are minimal varints.
 */
static char *put_vmas_entry(const struct vmctl_table *table, size_t i, uint32_t mask, char *w)
{
	char *body = w + 3;
	size_t n = (size_t)(put_vma(table, i, mask, body) - body);
	size_t k = varint_len(n);

	*w = VMAS_TAG;
	if (k != 2)
		memmove(w + 1 + k, body, n);
	put_varint(w + 1, n);
	return w + 1 + k + n;
}

int vmctl_table_encode(const struct vmctl_table *table, uint32_t mask, const char *prefix, size_t prefix_len,
		       char **out, size_t *out_len)
{
	size_t bound = prefix_len + table_bound(table);
	char *buf, *w;

	buf = malloc(bound ? bound : 1);
	if (!buf)
		return -ENOMEM;
	memcpy(buf, prefix, prefix_len);
	w = buf + prefix_len;
	for (size_t i = 0; i < table->len; i++)
		w = put_vmas_entry(table, i, mask, w);
	*out = buf;
	*out_len = (size_t)(w - buf);
	return 0;
}

int vmctl_table_encode_chunks(const struct vmctl_table *table, uint32_t mask, size_t max_chunk, char **out,
			      size_t *out_len, size_t **ends, size_t *chunk_count)
{
	size_t bound = table_bound(table), count = 0, chunk_start = 0, previous_end = 0;
	char *buf = malloc(bound ? bound : 1);
	/* Every chunk holds at least one VMA: len ends are always enough. */
	size_t *cuts = malloc(table->len ? table->len * sizeof(*cuts) : 1);
	char *w;

	if (!buf || !cuts) {
		free(buf);
		free(cuts);
		return -ENOMEM;
	}
	w = buf;
	for (size_t i = 0; i < table->len; i++) {
		size_t end;

		w = put_vmas_entry(table, i, mask, w);
		end = (size_t)(w - buf);
		if (end - previous_end > max_chunk) {
			free(buf);
			free(cuts);
			return -E2BIG;
		}
		if (end - chunk_start > max_chunk) {
			/* This VMA does not fit: the chunk ends before it. */
			cuts[count++] = previous_end;
			chunk_start = previous_end;
		}
		previous_end = end;
	}
	if (previous_end > chunk_start)
		cuts[count++] = previous_end;
	*out = buf;
	*out_len = previous_end;
	*ends = cuts;
	*chunk_count = count;
	return 0;
}

void vmctl_free(void *buffer)
{
	free(buffer);
}

/* ------------------------------------------------------- layout by query */

#define PROCMAP_QUERY_COVERING_OR_NEXT_VMA 0x10u
#define QUERY_NAME_MAX 4096u /* PATH_MAX: what d_path may need */

/* The name as /proc/PID/maps prints it: seq_path escapes "\n" as "\012". */
static int append_name(struct vmctl_table *t, const char *name, size_t n, size_t *off)
{
	const char *nl = memchr(name, '\n', n);
	int err;

	if (!nl)
		return text_append(t, name, n, off);
	*off = t->text_len;
	while (n) {
		size_t run = nl ? (size_t)(nl - name) : n, ignored;

		if ((err = text_append(t, name, run, &ignored)))
			return err;
		name += run;
		n -= run;
		if (!nl)
			break;
		if ((err = text_append(t, "\\012", 4, &ignored)))
			return err;
		name++;
		n--;
		nl = memchr(name, '\n', n);
	}
	return 0;
}

/* One PROCMAP_QUERY: the VMA covering addr or the next one, with its name when name is not NULL. */
static int query_vma(int maps_fd, uint64_t addr, char *name, struct procmap_query *q)
{
	for (;;) {
		memset(q, 0, sizeof(*q));
		q->size = sizeof(*q);
		q->query_flags = PROCMAP_QUERY_COVERING_OR_NEXT_VMA;
		q->query_addr = addr;
		if (name) {
			q->vma_name_addr = (uint64_t)(uintptr_t)name;
			q->vma_name_size = QUERY_NAME_MAX;
		}
		if (ioctl(maps_fd, PROCMAP_QUERY, q) == 0)
			return 0;
		if (errno != EINTR)
			return -errno;
	}
}

/*
 * vmctl_table_query and vmctl_table_query_layout: with all_names false, a
 * file VMA is asked without its name (d_path, most of what a name costs;
 * its kind is KIND_FILE whatever the name), and a VMA without a file with
 * it, which its kind depends on. Which one comes next is guessed from the
 * one before (VMAs come in runs: a library's segments, heap regions); a
 * wrong guess costs a file VMA its name or a VMA without one a second ioctl.
 */
static int table_query(int maps_fd, bool all_names, const char *tail, size_t tail_len, struct vmctl_table **out,
		       size_t *bad_line)
{
	struct vmctl_table *t = table_new(64u << 10, 1024, false);
	char *name = malloc(QUERY_NAME_MAX);
	uint64_t addr = 0;
	size_t line = 0, used;
	bool want_name = true;
	int err = 0;

	if (!t || !name) {
		free(name);
		table_free(t);
		return -ENOMEM;
	}
	for (;;) {
		struct procmap_query q;
		struct vmctl_vma *v;
		bool no_file;

		err = query_vma(maps_fd, addr, want_name ? name : NULL, &q);
		no_file = !err && !q.inode && !q.dev_major && !q.dev_minor;
		if (no_file && !want_name)
			err = query_vma(maps_fd, addr, name, &q); /* no file: the name gives the kind */
		want_name = all_names || no_file;
		if (err) {
			if (err == -ENOENT) /* no VMA at or above addr: the end */
				err = 0;
			break;
		}
		if (q.vma_end <= q.vma_start || q.vma_start < addr) {
			err = -EIO; /* never from a kernel that works: no loop, no table */
			break;
		}
		if (t->len == t->cap && (err = table_grow(t)))
			break;
		v = &t->vmas[t->len];
		v->start = q.vma_start;
		v->end = q.vma_end;
		v->offset = q.vma_offset;
		v->inode = q.inode;
		v->dev_major = q.dev_major;
		v->dev_minor = q.dev_minor;
		/* PROCMAP_QUERY_VMA_READABLE .. _SHARED are PERM_READ .. PERM_SHARED */
		v->perm_flags = (uint8_t)(q.vma_flags & (PERM_READ | PERM_WRITE | PERM_EXEC | PERM_SHARED));
		v->perms[0] = v->perm_flags & PERM_READ ? 'r' : '-';
		v->perms[1] = v->perm_flags & PERM_WRITE ? 'w' : '-';
		v->perms[2] = v->perm_flags & PERM_EXEC ? 'x' : '-';
		v->perms[3] = v->perm_flags & PERM_SHARED ? 's' : 'p';
		/* vma_name_size counts the terminating NUL; 0 for no name */
		v->path_len = 0;
		v->path_off = t->text_len;
		if (q.vma_name_size > 1) {
			size_t n = strnlen(name, q.vma_name_size - 1), skip = 0;

			while (skip < n && name[skip] == ' ') /* as parse_header strips the padding */
				skip++;
			if ((err = append_name(t, name + skip, n - skip, &v->path_off)))
				break;
			v->path_len = t->text_len - v->path_off;
		}
		v->path_utf8 = utf8_valid((const uint8_t *)t->text + v->path_off, v->path_len);
		v->kind = vma_kind(v, t->text + v->path_off);
		v->rss = v->swap = 0;
		v->build_id_len = 0;
		v->build_id_off = 0;
		t->len++;
		addr = q.vma_end;
	}
	free(name);
	if (err) {
		table_free(t);
		*bad_line = 0;
		return err;
	}
	if (tail_len)
		err = parse_lines(t, false, tail, tail + tail_len, true, &used, &line);
	return finish(t, err, line, out, bad_line);
}

int vmctl_table_query(int maps_fd, const char *tail, size_t tail_len, struct vmctl_table **out, size_t *bad_line)
{
	return table_query(maps_fd, true, tail, tail_len, out, bad_line);
}

int vmctl_table_query_layout(int maps_fd, const char *tail, size_t tail_len, struct vmctl_table **out,
			     size_t *bad_line)
{
	return table_query(maps_fd, false, tail, tail_len, out, bad_line);
}
