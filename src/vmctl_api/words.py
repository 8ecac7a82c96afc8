"""The contract's words and numbers, in the one place both ends import.

Attribute bits and the words of each group, VMA kinds, advice and filter
names with their numbers, cookie outcomes, and every reason the agent can put
in a refusal's ``google.rpc.ErrorInfo``. Plain Python values and ``Literal``
types, importing nothing but ``typing``: the agent's core (which must stay
free of protobuf) derives its constants from here, and so does the client.

The numbers are the proto's: tests/test_words.py checks them against the
generated descriptor, and the copies the C extension needs against
backends/native/csrc/vmctl_internal.h.
"""

from __future__ import annotations

from typing import Final, Literal, NamedTuple, get_args

# ---- attributes: VmaAttr bits, one per cost tier, and the words each fills ----------

ATTR_LAYOUT: Final = 1  # /proc/PID/maps; always filled
ATTR_BUILD_ID: Final = 2  # one PROCMAP_QUERY per file VMA
ATTR_RESIDENCY: Final = 4  # one PAGEMAP_SCAN walk
ATTR_ACCOUNTING: Final = 8  # /proc/PID/smaps
ATTR_ACCESS: Final = 16  # clear_refs, a sampling window, then smaps
# "all": every group a snapshot reads at once. ACCESS is left out: it needs a
# window, and it changes how the kernel ages the target's pages.
ATTR_ALL: Final = ATTR_LAYOUT | ATTR_BUILD_ID | ATTR_RESIDENCY | ATTR_ACCOUNTING
ATTR_KNOWN: Final = ATTR_ALL | ATTR_ACCESS  # every VmaAttr bit

LayoutWord = Literal["start", "end", "perms", "offset", "dev_major", "dev_minor", "inode", "path", "kind"]
BuildIdWord = Literal["build_id"]
ResidencyWord = Literal["rss", "swap"]
AccountingWord = Literal[
    "pss",
    "pss_dirty",
    "referenced",
    "anonymous",
    "shared_clean",
    "shared_dirty",
    "private_clean",
    "private_dirty",
    "ksm",
    "lazy_free",
    "anon_huge_pages",
    "shmem_pmd_mapped",
    "file_pmd_mapped",
    "shared_hugetlb",
    "private_hugetlb",
    "swap_pss",
    "locked",
    "kernel_page_size",
    "mmu_page_size",
    "thp_eligible",
    "vm_flags",
]
AccessWord = Literal["accessed"]
AttrWord = Literal[LayoutWord, BuildIdWord, ResidencyWord, AccountingWord, AccessWord]
"""A field of a VMA, by the name the CLI and the library give it."""
AttrGroup = Literal["layout", "build_id", "residency", "accounting", "access", "all"]
Attr = Literal[AttrWord, AttrGroup]
"""What ``get_vma_info(attrs=...)`` and ``vmctl maps --attrs`` take: a word or a group."""

# The words of each VmaAttr group, in the order the CLI and JSON list them.
GROUP_WORDS: Final[dict[int, tuple[AttrWord, ...]]] = {
    ATTR_LAYOUT: get_args(LayoutWord),
    ATTR_BUILD_ID: get_args(BuildIdWord),
    ATTR_RESIDENCY: get_args(ResidencyWord),
    ATTR_ACCOUNTING: get_args(AccountingWord),
    ATTR_ACCESS: get_args(AccessWord),
}
GROUPS: Final[dict[AttrGroup, int]] = {
    "layout": ATTR_LAYOUT,
    "build_id": ATTR_BUILD_ID,
    "residency": ATTR_RESIDENCY,
    "accounting": ATTR_ACCOUNTING,
    "access": ATTR_ACCESS,
    "all": ATTR_ALL,
}

# The sampling window of ATTR_ACCESS (GetVmaInfoRequest.access_window_ms): long
# enough for a page to be touched at all, short enough that a call's slot and
# the per-process sampler lock are not held for minutes.
ACCESS_WINDOW_MIN_MS: Final = 100
ACCESS_WINDOW_MAX_MS: Final = 60_000
WORD_GROUP: Final[dict[AttrWord, int]] = {word: group for group, words in GROUP_WORDS.items() for word in words}

# The vmctl.v1.Vma field that carries each word: sizes are in bytes and say so.
_NOT_SIZES: tuple[AttrWord, ...] = (*get_args(LayoutWord), "build_id", "thp_eligible", "vm_flags")
VMA_FIELDS: Final[dict[AttrWord, str]] = {word: word if word in _NOT_SIZES else f"{word}_bytes" for word in WORD_GROUP}

# ---- VMA kinds (vmctl.v1.VmaKind) ----------------------------------------------------

KIND_ANONYMOUS: Final = 1  # no backing file: heap, stack, private anonymous, [anon:NAME]
KIND_FILE: Final = 2  # file-backed, shmem and memfd included
KIND_SPECIAL: Final = 3  # the kernel's own ([vdso], [vvar], [vsyscall]): never advised
Kind = Literal["anonymous", "file", "special"]
KINDS: Final[dict[Kind, int]] = {"anonymous": KIND_ANONYMOUS, "file": KIND_FILE, "special": KIND_SPECIAL}
KIND_NAMES: Final[dict[int, Kind]] = {number: name for name, number in KINDS.items()}

# ---- advice (vmctl.v1.Advice) and the madvise(2) advice each applies -----------------

Advice = Literal["cold", "pageout", "willneed", "collapse"]


class AdviceNumbers(NamedTuple):
    number: int  # vmctl.v1.Advice
    madvise: int  # MADV_* of madvise(2), as process_madvise takes it


ADVICES: Final[dict[Advice, AdviceNumbers]] = {
    "cold": AdviceNumbers(1, 20),  # MADV_COLD: deactivate, reclaimed first under pressure
    "pageout": AdviceNumbers(2, 21),  # MADV_PAGEOUT: reclaim now (anonymous memory needs swap)
    "willneed": AdviceNumbers(3, 3),  # MADV_WILLNEED: read ahead, swap in
    "collapse": AdviceNumbers(4, 25),  # MADV_COLLAPSE: into transparent huge pages
}
ADVICE_BY_NUMBER: Final[dict[int, Advice]] = {numbers.number: name for name, numbers in ADVICES.items()}

# ---- filters (vmctl.v1.Filter): the VMA kinds whose parts of a range are advised ----

Filter = Literal["none", "anonymous", "file"]


class FilterKinds(NamedTuple):
    number: int  # vmctl.v1.Filter ("none" is FILTER_UNSPECIFIED)
    kinds: tuple[Kind, ...]  # what it admits; special mappings never


FILTERS: Final[dict[Filter, FilterKinds]] = {
    "none": FilterKinds(0, ("anonymous", "file")),
    "anonymous": FilterKinds(1, ("anonymous",)),
    "file": FilterKinds(2, ("file",)),
}
FILTER_BY_NUMBER: Final[dict[int, Filter]] = {kinds.number: name for name, kinds in FILTERS.items()}

# ---- scopes (vmctl.v1.Scope): how much of the cookie's layout must still hold -------

Scope = Literal["whole", "ranges"]
SCOPES: Final[dict[Scope, int]] = {"whole": 1, "ranges": 2}  # SCOPE_UNSPECIFIED (0) is "whole"
SCOPE_BY_NUMBER: Final[dict[int, Scope]] = {0: "whole", **{number: name for name, number in SCOPES.items()}}
# How an AdviseRanges call's layout was checked: the audit log's and the metrics' words.
ScopeCheck = Literal["whole", "ranges", "fallback"]
SCOPE_CHECKS: Final[dict[ScopeCheck, str]] = {
    "whole": "the whole layout against the cookie (SCOPE_WHOLE)",
    "ranges": "each range against what the cookie's snapshot saw there (SCOPE_RANGES)",
    "fallback": "SCOPE_RANGES asked, the snapshot no longer cached: the whole layout instead",
}

# Why AdviseRanges left one range unadvised in an OK reply (RangeResult.reason): not
# refusals of the call, so not in REASONS.
RANGE_RESULT_REASONS: Final[dict[str, str]] = {
    "RANGE_CHANGED": "the range no longer lies in memory of the kind the cookie's snapshot saw there;"
    " not advised: read again",
}

# ---- what became of an AdviseRanges call's cookie: audit log and metrics alike ------

CookieOutcome = Literal["valid", "absent", "missing", "invalid", "process_changed", "layout_changed", "unchecked"]
COOKIE_OUTCOMES: Final[dict[CookieOutcome, str]] = {
    "valid": "the cookie passed every check",
    "absent": "no cookie, and the policy does not require one",
    "missing": "COOKIE_REQUIRED: no cookie where one is required",
    "invalid": "COOKIE_INVALID: forged, edited, truncated, another key, host, boot or pid",
    "process_changed": "PROCESS_CHANGED: the pid was reused or the process exec'd",
    "layout_changed": "LAYOUT_CHANGED: the address space moved since the cookie",
    "unchecked": "the call was refused before its cookie was checked to the end",
}

# ---- refusals: every ErrorInfo reason (domain vmctl.dev), its status, its meaning ---

ERROR_DOMAIN: Final = "vmctl.dev"

StatusName = Literal[
    "INVALID_ARGUMENT",
    "FAILED_PRECONDITION",
    "NOT_FOUND",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "RESOURCE_EXHAUSTED",
    "DEADLINE_EXCEEDED",
    "UNAVAILABLE",
    "INTERNAL",
]
"""The gRPC status codes the agent refuses with, by name (grpc.StatusCode's)."""


class Reason(NamedTuple):
    status: StatusName
    means: str  # what the client says when the agent sent no message


REASONS: Final[dict[str, Reason]] = {
    # The request as sent can never succeed.
    "INVALID_PID": Reason("INVALID_ARGUMENT", "the pid is out of range, or names a thread rather than a process"),
    "UNKNOWN_ATTR": Reason("INVALID_ARGUMENT", "attr_mask has bits no VmaAttr names"),
    "INVALID_WINDOW": Reason(
        "INVALID_ARGUMENT",
        "access_window_ms must be 100 to 60000 with VMA_ATTR_ACCESS (and unset without it), within the call's deadline",
    ),
    "UNKNOWN_ADVICE": Reason("INVALID_ARGUMENT", "the advice is none this agent knows"),
    "UNKNOWN_FILTER": Reason("INVALID_ARGUMENT", "the filter is none this agent knows"),
    "NO_RANGES": Reason("INVALID_ARGUMENT", "no ranges were given"),
    "TOO_MANY_RANGES": Reason("INVALID_ARGUMENT", "more ranges than the agent's --max-ranges"),
    "RANGE_UNALIGNED": Reason("INVALID_ARGUMENT", "a range does not start and end on page boundaries"),
    "RANGE_EMPTY": Reason("INVALID_ARGUMENT", "a range is empty"),
    "RANGE_WRAPS": Reason("INVALID_ARGUMENT", "a range ends before it starts"),
    "RANGE_OVERLAP": Reason("INVALID_ARGUMENT", "two ranges overlap"),
    "RANGE_UNMAPPED": Reason("INVALID_ARGUMENT", "a range is not wholly inside mapped memory"),
    "COOKIE_REQUIRED": Reason("INVALID_ARGUMENT", "a cookie from GetVmaInfo is required: read the layout first"),
    "COOKIE_INVALID": Reason(
        "INVALID_ARGUMENT", "the cookie is not one this agent issued for this process on this boot"
    ),
    "MALFORMED_REQUEST": Reason("INVALID_ARGUMENT", "the request bytes do not parse"),
    # The process is not what the caller saw: read again.
    "LAYOUT_CHANGED": Reason("FAILED_PRECONDITION", "the address space changed since the cookie: read it again"),
    "PROCESS_CHANGED": Reason("FAILED_PRECONDITION", "the pid was reused, or the process exec'd"),
    "PROCESS_GONE": Reason("NOT_FOUND", "no such process, or it exited"),
    "NO_ADDRESS_SPACE": Reason("FAILED_PRECONDITION", "a kernel thread: there is no user address space"),
    # The kernel beneath the agent.
    "ACCESS_DENIED": Reason("PERMISSION_DENIED", "the kernel refused the agent"),
    "KERNEL_UNSUPPORTED": Reason("FAILED_PRECONDITION", "this kernel lacks the system call, ioctl or advice"),
    # Who may call, and how much.
    "UNAUTHENTICATED": Reason("UNAUTHENTICATED", "no credentials, and no policy rule for anonymous callers"),
    "POLICY_DENIED": Reason("PERMISSION_DENIED", "no policy rule grants this verb, target or advice"),
    "PROTECTED_TARGET": Reason("PERMISSION_DENIED", "the target is never advised (pid 1, the agent, protected)"),
    "CONCURRENCY_LIMIT": Reason("RESOURCE_EXHAUSTED", "too many calls in flight; try again later"),
    "RATE_LIMITED": Reason("RESOURCE_EXHAUSTED", "over the caller's call rate; try again later"),
    "SAMPLER_BUSY": Reason(
        "RESOURCE_EXHAUSTED",
        "another sampler of this process held it until the window no longer fitted the call's deadline;"
        " nothing was done: try again later",
    ),
    "TOO_MANY_CALLS": Reason(
        "RESOURCE_EXHAUSTED", "the caller holds too many health or reflection calls open at once; close some"
    ),
    "REQUEST_TIMEOUT": Reason("DEADLINE_EXCEEDED", "the request did not arrive within --request-timeout"),
    # The agent itself.
    "AUDIT_UNAVAILABLE": Reason("UNAVAILABLE", "the agent refuses advice until its audit log can be written"),
    "AGENT_STOPPING": Reason("UNAVAILABLE", "the agent is shutting down; the call was not started"),
    "INTERNAL": Reason("INTERNAL", "the agent failed; its log says why"),
}
