from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VmaAttr(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VMA_ATTR_UNSPECIFIED: _ClassVar[VmaAttr]
    VMA_ATTR_LAYOUT: _ClassVar[VmaAttr]
    VMA_ATTR_BUILD_ID: _ClassVar[VmaAttr]
    VMA_ATTR_RESIDENCY: _ClassVar[VmaAttr]
    VMA_ATTR_ACCOUNTING: _ClassVar[VmaAttr]
    VMA_ATTR_ACCESS: _ClassVar[VmaAttr]

class VmaKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VMA_KIND_UNSPECIFIED: _ClassVar[VmaKind]
    VMA_KIND_ANONYMOUS: _ClassVar[VmaKind]
    VMA_KIND_FILE: _ClassVar[VmaKind]
    VMA_KIND_SPECIAL: _ClassVar[VmaKind]

class Advice(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADVICE_UNSPECIFIED: _ClassVar[Advice]
    ADVICE_COLD: _ClassVar[Advice]
    ADVICE_PAGEOUT: _ClassVar[Advice]
    ADVICE_WILLNEED: _ClassVar[Advice]
    ADVICE_COLLAPSE: _ClassVar[Advice]

class Filter(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FILTER_UNSPECIFIED: _ClassVar[Filter]
    FILTER_ANONYMOUS: _ClassVar[Filter]
    FILTER_FILE: _ClassVar[Filter]

class Scope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCOPE_UNSPECIFIED: _ClassVar[Scope]
    SCOPE_WHOLE: _ClassVar[Scope]
    SCOPE_RANGES: _ClassVar[Scope]
VMA_ATTR_UNSPECIFIED: VmaAttr
VMA_ATTR_LAYOUT: VmaAttr
VMA_ATTR_BUILD_ID: VmaAttr
VMA_ATTR_RESIDENCY: VmaAttr
VMA_ATTR_ACCOUNTING: VmaAttr
VMA_ATTR_ACCESS: VmaAttr
VMA_KIND_UNSPECIFIED: VmaKind
VMA_KIND_ANONYMOUS: VmaKind
VMA_KIND_FILE: VmaKind
VMA_KIND_SPECIAL: VmaKind
ADVICE_UNSPECIFIED: Advice
ADVICE_COLD: Advice
ADVICE_PAGEOUT: Advice
ADVICE_WILLNEED: Advice
ADVICE_COLLAPSE: Advice
FILTER_UNSPECIFIED: Filter
FILTER_ANONYMOUS: Filter
FILTER_FILE: Filter
SCOPE_UNSPECIFIED: Scope
SCOPE_WHOLE: Scope
SCOPE_RANGES: Scope

class Process(_message.Message):
    __slots__ = ("pid", "start_time", "comm")
    PID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    COMM_FIELD_NUMBER: _ClassVar[int]
    pid: int
    start_time: int
    comm: str
    def __init__(self, pid: _Optional[int] = ..., start_time: _Optional[int] = ..., comm: _Optional[str] = ...) -> None: ...

class GetVmaInfoRequest(_message.Message):
    __slots__ = ("pid", "attr_mask", "access_window_ms")
    PID_FIELD_NUMBER: _ClassVar[int]
    ATTR_MASK_FIELD_NUMBER: _ClassVar[int]
    ACCESS_WINDOW_MS_FIELD_NUMBER: _ClassVar[int]
    pid: int
    attr_mask: int
    access_window_ms: int
    def __init__(self, pid: _Optional[int] = ..., attr_mask: _Optional[int] = ..., access_window_ms: _Optional[int] = ...) -> None: ...

class Vma(_message.Message):
    __slots__ = ("start", "end", "perms", "offset", "dev_major", "dev_minor", "inode", "path", "kind", "rss_bytes", "swap_bytes", "pss_bytes", "referenced_bytes", "anonymous_bytes", "build_id", "pss_dirty_bytes", "shared_clean_bytes", "shared_dirty_bytes", "private_clean_bytes", "private_dirty_bytes", "ksm_bytes", "lazy_free_bytes", "anon_huge_pages_bytes", "shmem_pmd_mapped_bytes", "file_pmd_mapped_bytes", "shared_hugetlb_bytes", "private_hugetlb_bytes", "swap_pss_bytes", "locked_bytes", "kernel_page_size_bytes", "mmu_page_size_bytes", "thp_eligible", "vm_flags", "accessed_bytes", "raw_path")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    PERMS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DEV_MAJOR_FIELD_NUMBER: _ClassVar[int]
    DEV_MINOR_FIELD_NUMBER: _ClassVar[int]
    INODE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    SWAP_BYTES_FIELD_NUMBER: _ClassVar[int]
    PSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    REFERENCED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ANONYMOUS_BYTES_FIELD_NUMBER: _ClassVar[int]
    BUILD_ID_FIELD_NUMBER: _ClassVar[int]
    PSS_DIRTY_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARED_CLEAN_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARED_DIRTY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_CLEAN_BYTES_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_DIRTY_BYTES_FIELD_NUMBER: _ClassVar[int]
    KSM_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAZY_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ANON_HUGE_PAGES_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHMEM_PMD_MAPPED_BYTES_FIELD_NUMBER: _ClassVar[int]
    FILE_PMD_MAPPED_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARED_HUGETLB_BYTES_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_HUGETLB_BYTES_FIELD_NUMBER: _ClassVar[int]
    SWAP_PSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOCKED_BYTES_FIELD_NUMBER: _ClassVar[int]
    KERNEL_PAGE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MMU_PAGE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    THP_ELIGIBLE_FIELD_NUMBER: _ClassVar[int]
    VM_FLAGS_FIELD_NUMBER: _ClassVar[int]
    ACCESSED_BYTES_FIELD_NUMBER: _ClassVar[int]
    RAW_PATH_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    perms: str
    offset: int
    dev_major: int
    dev_minor: int
    inode: int
    path: str
    kind: VmaKind
    rss_bytes: int
    swap_bytes: int
    pss_bytes: int
    referenced_bytes: int
    anonymous_bytes: int
    build_id: bytes
    pss_dirty_bytes: int
    shared_clean_bytes: int
    shared_dirty_bytes: int
    private_clean_bytes: int
    private_dirty_bytes: int
    ksm_bytes: int
    lazy_free_bytes: int
    anon_huge_pages_bytes: int
    shmem_pmd_mapped_bytes: int
    file_pmd_mapped_bytes: int
    shared_hugetlb_bytes: int
    private_hugetlb_bytes: int
    swap_pss_bytes: int
    locked_bytes: int
    kernel_page_size_bytes: int
    mmu_page_size_bytes: int
    thp_eligible: bool
    vm_flags: str
    accessed_bytes: int
    raw_path: bytes
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., perms: _Optional[str] = ..., offset: _Optional[int] = ..., dev_major: _Optional[int] = ..., dev_minor: _Optional[int] = ..., inode: _Optional[int] = ..., path: _Optional[str] = ..., kind: _Optional[_Union[VmaKind, str]] = ..., rss_bytes: _Optional[int] = ..., swap_bytes: _Optional[int] = ..., pss_bytes: _Optional[int] = ..., referenced_bytes: _Optional[int] = ..., anonymous_bytes: _Optional[int] = ..., build_id: _Optional[bytes] = ..., pss_dirty_bytes: _Optional[int] = ..., shared_clean_bytes: _Optional[int] = ..., shared_dirty_bytes: _Optional[int] = ..., private_clean_bytes: _Optional[int] = ..., private_dirty_bytes: _Optional[int] = ..., ksm_bytes: _Optional[int] = ..., lazy_free_bytes: _Optional[int] = ..., anon_huge_pages_bytes: _Optional[int] = ..., shmem_pmd_mapped_bytes: _Optional[int] = ..., file_pmd_mapped_bytes: _Optional[int] = ..., shared_hugetlb_bytes: _Optional[int] = ..., private_hugetlb_bytes: _Optional[int] = ..., swap_pss_bytes: _Optional[int] = ..., locked_bytes: _Optional[int] = ..., kernel_page_size_bytes: _Optional[int] = ..., mmu_page_size_bytes: _Optional[int] = ..., thp_eligible: _Optional[bool] = ..., vm_flags: _Optional[str] = ..., accessed_bytes: _Optional[int] = ..., raw_path: _Optional[bytes] = ...) -> None: ...

class GetVmaInfoResponse(_message.Message):
    __slots__ = ("process", "cookie", "result_mask", "vmas")
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    COOKIE_FIELD_NUMBER: _ClassVar[int]
    RESULT_MASK_FIELD_NUMBER: _ClassVar[int]
    VMAS_FIELD_NUMBER: _ClassVar[int]
    process: Process
    cookie: bytes
    result_mask: int
    vmas: _containers.RepeatedCompositeFieldContainer[Vma]
    def __init__(self, process: _Optional[_Union[Process, _Mapping]] = ..., cookie: _Optional[bytes] = ..., result_mask: _Optional[int] = ..., vmas: _Optional[_Iterable[_Union[Vma, _Mapping]]] = ...) -> None: ...

class StreamVmaInfoRequest(_message.Message):
    __slots__ = ("pid", "attr_mask", "access_window_ms")
    PID_FIELD_NUMBER: _ClassVar[int]
    ATTR_MASK_FIELD_NUMBER: _ClassVar[int]
    ACCESS_WINDOW_MS_FIELD_NUMBER: _ClassVar[int]
    pid: int
    attr_mask: int
    access_window_ms: int
    def __init__(self, pid: _Optional[int] = ..., attr_mask: _Optional[int] = ..., access_window_ms: _Optional[int] = ...) -> None: ...

class StreamVmaInfoResponse(_message.Message):
    __slots__ = ("process", "cookie", "result_mask", "vmas")
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    COOKIE_FIELD_NUMBER: _ClassVar[int]
    RESULT_MASK_FIELD_NUMBER: _ClassVar[int]
    VMAS_FIELD_NUMBER: _ClassVar[int]
    process: Process
    cookie: bytes
    result_mask: int
    vmas: _containers.RepeatedCompositeFieldContainer[Vma]
    def __init__(self, process: _Optional[_Union[Process, _Mapping]] = ..., cookie: _Optional[bytes] = ..., result_mask: _Optional[int] = ..., vmas: _Optional[_Iterable[_Union[Vma, _Mapping]]] = ...) -> None: ...

class AddressRange(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class AdviseRangesRequest(_message.Message):
    __slots__ = ("pid", "ranges", "advice", "cookie", "filter", "dry_run", "scope")
    PID_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    ADVICE_FIELD_NUMBER: _ClassVar[int]
    COOKIE_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    pid: int
    ranges: _containers.RepeatedCompositeFieldContainer[AddressRange]
    advice: Advice
    cookie: bytes
    filter: Filter
    dry_run: bool
    scope: Scope
    def __init__(self, pid: _Optional[int] = ..., ranges: _Optional[_Iterable[_Union[AddressRange, _Mapping]]] = ..., advice: _Optional[_Union[Advice, str]] = ..., cookie: _Optional[bytes] = ..., filter: _Optional[_Union[Filter, str]] = ..., dry_run: _Optional[bool] = ..., scope: _Optional[_Union[Scope, str]] = ...) -> None: ...

class RangeResult(_message.Message):
    __slots__ = ("start", "end", "advised_bytes", "skipped_bytes", "error", "error_number", "reason")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    ADVISED_BYTES_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_NUMBER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    advised_bytes: int
    skipped_bytes: int
    error: str
    error_number: int
    reason: str
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., advised_bytes: _Optional[int] = ..., skipped_bytes: _Optional[int] = ..., error: _Optional[str] = ..., error_number: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class AdviseRangesResponse(_message.Message):
    __slots__ = ("requested_bytes", "advised_bytes", "syscalls", "ranges", "process", "dry_run", "scope", "changed_ranges", "scope_fallback")
    REQUESTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ADVISED_BYTES_FIELD_NUMBER: _ClassVar[int]
    SYSCALLS_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    CHANGED_RANGES_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    requested_bytes: int
    advised_bytes: int
    syscalls: int
    ranges: _containers.RepeatedCompositeFieldContainer[RangeResult]
    process: Process
    dry_run: bool
    scope: Scope
    changed_ranges: int
    scope_fallback: bool
    def __init__(self, requested_bytes: _Optional[int] = ..., advised_bytes: _Optional[int] = ..., syscalls: _Optional[int] = ..., ranges: _Optional[_Iterable[_Union[RangeResult, _Mapping]]] = ..., process: _Optional[_Union[Process, _Mapping]] = ..., dry_run: _Optional[bool] = ..., scope: _Optional[_Union[Scope, str]] = ..., changed_ranges: _Optional[int] = ..., scope_fallback: _Optional[bool] = ...) -> None: ...

class ListProcessesRequest(_message.Message):
    __slots__ = ("cgroup_prefix", "with_vma_count")
    CGROUP_PREFIX_FIELD_NUMBER: _ClassVar[int]
    WITH_VMA_COUNT_FIELD_NUMBER: _ClassVar[int]
    cgroup_prefix: str
    with_vma_count: bool
    def __init__(self, cgroup_prefix: _Optional[str] = ..., with_vma_count: _Optional[bool] = ...) -> None: ...

class ProcessInfo(_message.Message):
    __slots__ = ("pid", "start_time", "comm", "cgroup", "container_id", "rss_bytes", "swap_bytes", "vma_count", "uid", "ppid", "cpu_time_ns", "major_faults")
    PID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    COMM_FIELD_NUMBER: _ClassVar[int]
    CGROUP_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    SWAP_BYTES_FIELD_NUMBER: _ClassVar[int]
    VMA_COUNT_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    PPID_FIELD_NUMBER: _ClassVar[int]
    CPU_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    MAJOR_FAULTS_FIELD_NUMBER: _ClassVar[int]
    pid: int
    start_time: int
    comm: str
    cgroup: str
    container_id: str
    rss_bytes: int
    swap_bytes: int
    vma_count: int
    uid: int
    ppid: int
    cpu_time_ns: int
    major_faults: int
    def __init__(self, pid: _Optional[int] = ..., start_time: _Optional[int] = ..., comm: _Optional[str] = ..., cgroup: _Optional[str] = ..., container_id: _Optional[str] = ..., rss_bytes: _Optional[int] = ..., swap_bytes: _Optional[int] = ..., vma_count: _Optional[int] = ..., uid: _Optional[int] = ..., ppid: _Optional[int] = ..., cpu_time_ns: _Optional[int] = ..., major_faults: _Optional[int] = ...) -> None: ...

class ListProcessesResponse(_message.Message):
    __slots__ = ("processes", "cgroup_memory_pressure")
    class CgroupMemoryPressureEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: MemoryPressure
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[MemoryPressure, _Mapping]] = ...) -> None: ...
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    CGROUP_MEMORY_PRESSURE_FIELD_NUMBER: _ClassVar[int]
    processes: _containers.RepeatedCompositeFieldContainer[ProcessInfo]
    cgroup_memory_pressure: _containers.MessageMap[str, MemoryPressure]
    def __init__(self, processes: _Optional[_Iterable[_Union[ProcessInfo, _Mapping]]] = ..., cgroup_memory_pressure: _Optional[_Mapping[str, MemoryPressure]] = ...) -> None: ...

class GetNodeInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PressureStall(_message.Message):
    __slots__ = ("avg10", "avg60", "avg300", "total_us")
    AVG10_FIELD_NUMBER: _ClassVar[int]
    AVG60_FIELD_NUMBER: _ClassVar[int]
    AVG300_FIELD_NUMBER: _ClassVar[int]
    TOTAL_US_FIELD_NUMBER: _ClassVar[int]
    avg10: float
    avg60: float
    avg300: float
    total_us: int
    def __init__(self, avg10: _Optional[float] = ..., avg60: _Optional[float] = ..., avg300: _Optional[float] = ..., total_us: _Optional[int] = ...) -> None: ...

class MemoryPressure(_message.Message):
    __slots__ = ("some", "full")
    SOME_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    some: PressureStall
    full: PressureStall
    def __init__(self, some: _Optional[_Union[PressureStall, _Mapping]] = ..., full: _Optional[_Union[PressureStall, _Mapping]] = ...) -> None: ...

class Capabilities(_message.Message):
    __slots__ = ("pidfd_open", "process_madvise", "advices", "procmap_query", "pagemap_scan", "advice_permitted", "probe_errors", "access_sampling")
    class ProbeErrorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PIDFD_OPEN_FIELD_NUMBER: _ClassVar[int]
    PROCESS_MADVISE_FIELD_NUMBER: _ClassVar[int]
    ADVICES_FIELD_NUMBER: _ClassVar[int]
    PROCMAP_QUERY_FIELD_NUMBER: _ClassVar[int]
    PAGEMAP_SCAN_FIELD_NUMBER: _ClassVar[int]
    ADVICE_PERMITTED_FIELD_NUMBER: _ClassVar[int]
    PROBE_ERRORS_FIELD_NUMBER: _ClassVar[int]
    ACCESS_SAMPLING_FIELD_NUMBER: _ClassVar[int]
    pidfd_open: bool
    process_madvise: bool
    advices: _containers.RepeatedScalarFieldContainer[Advice]
    procmap_query: bool
    pagemap_scan: bool
    advice_permitted: bool
    probe_errors: _containers.ScalarMap[str, str]
    access_sampling: str
    def __init__(self, pidfd_open: _Optional[bool] = ..., process_madvise: _Optional[bool] = ..., advices: _Optional[_Iterable[_Union[Advice, str]]] = ..., procmap_query: _Optional[bool] = ..., pagemap_scan: _Optional[bool] = ..., advice_permitted: _Optional[bool] = ..., probe_errors: _Optional[_Mapping[str, str]] = ..., access_sampling: _Optional[str] = ...) -> None: ...

class GetNodeInfoResponse(_message.Message):
    __slots__ = ("hostname", "kernel", "boot_id", "mem_total_bytes", "mem_available_bytes", "swap_total_bytes", "swap_free_bytes", "memory_pressure", "capabilities", "agent_version", "page_size", "machine")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    MEM_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEM_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SWAP_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SWAP_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_PRESSURE_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MACHINE_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    kernel: str
    boot_id: str
    mem_total_bytes: int
    mem_available_bytes: int
    swap_total_bytes: int
    swap_free_bytes: int
    memory_pressure: MemoryPressure
    capabilities: Capabilities
    agent_version: str
    page_size: int
    machine: str
    def __init__(self, hostname: _Optional[str] = ..., kernel: _Optional[str] = ..., boot_id: _Optional[str] = ..., mem_total_bytes: _Optional[int] = ..., mem_available_bytes: _Optional[int] = ..., swap_total_bytes: _Optional[int] = ..., swap_free_bytes: _Optional[int] = ..., memory_pressure: _Optional[_Union[MemoryPressure, _Mapping]] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ..., agent_version: _Optional[str] = ..., page_size: _Optional[int] = ..., machine: _Optional[str] = ...) -> None: ...
