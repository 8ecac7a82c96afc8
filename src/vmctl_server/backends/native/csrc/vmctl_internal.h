/*
 * What vmctl_native.c (the VMA tables) and vmctl_advice.c (AdviseRanges)
 * share: the layout's constants and the protobuf wire writers. Not part of
 * the API cffi sees (that is vmctl_native.h).
 */
#ifndef VMCTL_INTERNAL_H
#define VMCTL_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/*
 * The contract's numbers, as vmctl_api/words.py has them (tests/test_words.py
 * reads these lines and compares): VmaKind values and VmaAttr bits.
 */
#define KIND_ANONYMOUS 1u
#define KIND_FILE 2u
#define KIND_SPECIAL 3u
#define ATTR_BUILD_ID 2u
#define ATTR_RESIDENCY 4u
#define ATTR_ACCOUNTING 8u
#define ATTR_ACCESS 16u

/* vmctl_server.core.layout: LAYOUT_RECORD ("<QQQQIIII") */
#define LAYOUT_RECORD_SIZE 48
#define LAYOUT_START_AT 0
#define LAYOUT_END_AT 8
#define LAYOUT_OFFSET_AT 16
#define LAYOUT_INODE_AT 24
#define LAYOUT_DEV_MAJOR_AT 32
#define LAYOUT_DEV_MINOR_AT 36
#define LAYOUT_KIND_AT 44

/* protobuf wire types */
#define WIRE_VARINT 0u
#define WIRE_FIXED64 1u
#define WIRE_BYTES 2u
#define WIRE_GROUP_START 3u
#define WIRE_GROUP_END 4u
#define WIRE_FIXED32 5u

static inline size_t varint_len(uint64_t v)
{
	size_t n = 1;

	while (v >= 0x80) {
		v >>= 7;
		n++;
	}
	return n;
}

static inline char *put_varint(char *p, uint64_t v)
{
	while (v >= 0x80) {
		*p++ = (char)(v | 0x80);
		v >>= 7;
	}
	*p++ = (char)v;
	return p;
}

/* proto3: a zero number is not written. */
static inline char *put_uint(char *p, unsigned field, uint64_t v)
{
	if (!v)
		return p;
	p = put_varint(p, (uint64_t)field << 3 | WIRE_VARINT);
	return put_varint(p, v);
}

/* proto3: an empty string or bytes is not written. */
static inline char *put_bytes(char *p, unsigned field, const void *s, size_t n)
{
	if (!n)
		return p;
	p = put_varint(p, (uint64_t)field << 3 | WIRE_BYTES);
	p = put_varint(p, n);
	memcpy(p, s, n);
	return p + n;
}

#endif /* VMCTL_INTERNAL_H */
