"""The deployment files: Kubernetes overlays rendered by kubectl and validated
against Kubernetes schemas, their security invariants, the container build
checked statically and its build context built for real, and the systemd unit
verified by systemd-analyze. (tests/test_privileges.py runs the agent under
the privileges these files grant.)"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import json
import os
import pathlib
import posixpath
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator

import kubernetes_validate
import pytest
import tomllib
from support.agent_workout import Rig, exercise_operations, exercise_tls
from support.cgroup2 import CGROUP2, _emptied_and_removed
from support.deploy_files import (
    AGENT,
    DEPLOY,
    DOCKERFILE,
    KUSTOMIZE_BASE,
    OVERLAYS,
    ROOT,
    UNIT,
    agent_container,
    only,
    render,
    require_tool,
    sidecar_container,
    unit_settings,
)
from support.peers import public_directory
from support.privileges import setpriv_prefix
from support.vmctl_cli import VMCTL
from support.waiting import wait_for

from vmctl_client.cli import build_parser as vmctl_parser
from vmctl_server import config as agent_cli
from vmctl_server.access.identity import Caller
from vmctl_server.access.policy import ADVISE, READ, Policy, parse_policy
from vmctl_server.core.faults import PolicyDenied
from vmctl_server.core.targets import Target

# kubectl here is 1.32; also the newest schemas kubernetes-validate bundles (it works offline from them).
SCHEMA_VERSIONS = ("1.32.0", kubernetes_validate.utils.latest_version())
CAPABILITIES = {"SYS_PTRACE", "SYS_NICE", "DAC_READ_SEARCH"}
OVERLAY_IDS = [p.name for p in OVERLAYS]
NAMESPACE = "vmctl-system"
SECCOMP_PROFILE = KUSTOMIZE_BASE / "seccomp" / "vmctl-agent.json"
SECCOMP_LOCALHOST_PROFILE = "vmctl/vmctl-agent.json"  # relative to kubelet's seccomp directory
KUBELET_SECCOMP_DIR = "/var/lib/kubelet/seccomp"  # <kubelet --root-dir>/seccomp, the default root
HEALTH_PORT, METRICS_PORT, VMCONTROL_PORT = 50052, 9464, 50051
# Kinds that have no namespace (kubectl api-resources --namespaced=false, Kubernetes 1.32); every
# kind the overlays render must be in this list or in NAMESPACED_KINDS, so a new kind is classified
# on purpose rather than assumed.
CLUSTER_SCOPED_KINDS = {
    "APIService",
    "CertificateSigningRequest",
    "ClusterRole",
    "ClusterRoleBinding",
    "ComponentStatus",
    "CSIDriver",
    "CSINode",
    "CustomResourceDefinition",
    "DeviceClass",
    "FlowSchema",
    "IngressClass",
    "IPAddress",
    "MutatingWebhookConfiguration",
    "Namespace",
    "Node",
    "PersistentVolume",
    "PriorityClass",
    "PriorityLevelConfiguration",
    "RuntimeClass",
    "ServiceCIDR",
    "StorageClass",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
    "ValidatingWebhookConfiguration",
    "VolumeAttachment",
}
NAMESPACED_KINDS = {
    "ConfigMap",
    "DaemonSet",
    "Deployment",
    "NetworkPolicy",
    "PodDisruptionBudget",
    "ResourceQuota",
    "Role",
    "RoleBinding",
    "Secret",
    "Service",
    "ServiceAccount",
}


@pytest.mark.unprivileged
def test_the_overlays_are_the_documented_three():
    assert OVERLAY_IDS == ["autoreclaim", "cluster-mtls", "node-local"]


# ---- Kubernetes ------------------------------------------------------------------


@pytest.mark.unprivileged
@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_overlay_renders_and_validates_against_kubernetes_schemas(overlay, version):
    docs = render(overlay)
    assert {d["kind"] for d in docs} >= {"Namespace", "ServiceAccount", "ConfigMap", "DaemonSet"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.unprivileged
def test_the_schema_check_rejects_a_broken_manifest():
    """A check that cannot fail proves nothing: a misspelt field and a wrong type must be caught."""
    daemonset = only(render(OVERLAYS[0]), "DaemonSet")
    misspelt = copy.deepcopy(daemonset)
    misspelt["spec"]["template"]["spec"]["hostPid"] = misspelt["spec"]["template"]["spec"].pop("hostPID")
    wrong_type = copy.deepcopy(daemonset)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["port"] = "health"
    for broken in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, SCHEMA_VERSIONS[0], strict=True)


def _agent_args(docs: tuple[dict, ...]) -> argparse.Namespace:
    """The container's arguments, parsed and checked by the agent's own CLI."""
    container = agent_container(docs)
    assert "command" not in container, "the image's ENTRYPOINT runs vmctl-agent"
    parser = agent_cli.build_parser()
    args = parser.parse_args(container["args"])  # an unknown or malformed flag exits here
    agent_cli.check_args(parser, args)
    return args


@pytest.mark.unprivileged
@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_daemonset_security_invariants(overlay):
    docs = render(overlay)
    daemonset = only(docs, "DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    container = agent_container(docs)
    security = container["securityContext"]

    assert pod["hostPID"] is True
    assert not pod.get("hostNetwork") and not pod.get("hostIPC")
    assert security["privileged"] is False
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert set(security["capabilities"]["add"]) == CAPABILITIES
    # The agent: its own Localhost seccomp profile (tests/test_seccomp_profile.py) and no AppArmor
    # profile (the runtime's default one refuses ptrace-reads of host processes: see the comment in
    # base/daemonset.yaml). The pod sandbox and the init container keep the runtime's defaults.
    assert security["seccompProfile"] == {"type": "Localhost", "localhostProfile": SECCOMP_LOCALHOST_PROFILE}
    assert security["appArmorProfile"] == {"type": "Unconfined"}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["appArmorProfile"] == {"type": "RuntimeDefault"}
    annotations = daemonset["spec"]["template"]["metadata"].get("annotations", {})
    assert not [a for a in annotations if a.startswith(("container.apparmor.", "seccomp.security."))], "deprecated"
    assert pod["securityContext"]["runAsUser"] == 0  # see the comment in base/daemonset.yaml
    assert pod["automountServiceAccountToken"] is False
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][kind].keys()


@pytest.mark.unprivileged
@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_probes_use_the_health_only_port(overlay):
    docs = render(overlay)
    container = agent_container(docs)
    args = _agent_args(docs)
    assert args.health_listen, "kubelet grpc probes need --health-listen"
    health_port = args.health_listen[1]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == health_port, probe
    assert container["readinessProbe"]["grpc"]["service"] == "vmctl.v1.VmControl"


@pytest.mark.unprivileged
@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_no_plaintext_vmcontrol_port(overlay):
    """Every TCP listener for VmControl is mutual TLS; the other ports carry only health and metrics."""
    docs = render(overlay)
    container = agent_container(docs)
    args = _agent_args(docs)
    assert not args.insecure
    tcp_ports = {int(a.text.rsplit(":", 1)[1]) for a in args.listen if a.unix_path is None}
    if tcp_ports:
        assert args.tls_cert and args.tls_key and args.client_ca, "TCP listeners need mutual TLS"
    declared = {p["containerPort"] for p in container.get("ports", [])}
    assert declared == tcp_ports | {args.health_listen[1], args.metrics_listen[1]}
    assert not any(p.get("hostPort") for p in container.get("ports", []))


@pytest.mark.unprivileged
@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_every_path_the_agent_uses_is_mounted(overlay):
    docs = render(overlay)
    container = agent_container(docs)
    pod = only(docs, "DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    args = _agent_args(docs)

    def mount_of(path: str) -> dict:
        found = [m for where, m in mounts.items() if path.startswith(where.rstrip("/") + "/")]
        assert found, f"{path} is on the read-only root filesystem"
        return found[0]

    sockets = [a.unix_path for a in args.listen if a.unix_path]
    assert sockets == ["/run/vmctl/agent.sock"]
    socket_volume = volumes[mount_of(sockets[0])["name"]]
    assert socket_volume["hostPath"]["path"] == "/run/vmctl"
    key_mount = mount_of(args.cookie_key_file)
    assert not key_mount.get("readOnly") and "hostPath" in volumes[key_mount["name"]]
    for tls_file in filter(None, (args.tls_cert, args.tls_key, args.client_ca)):
        assert volumes[mount_of(tls_file)["name"]]["secret"]["defaultMode"] == 0o400
    assert "configMap" in volumes[mount_of(args.policy)["name"]]


def init_container(docs: tuple[dict, ...]) -> dict:
    (init,) = only(docs, "DaemonSet")["spec"]["template"]["spec"]["initContainers"]
    return init


@pytest.mark.unprivileged
@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_the_profile_installer_may_write_the_profiles_directory_and_nothing_else(overlay):
    docs = render(overlay)
    pod = only(docs, "DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    init, agent = init_container(docs), agent_container(docs)
    assert init["image"] == agent["image"], "the agent's own image: nothing else to trust or pull"
    security = init["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["privileged"] is False and security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert "seccompProfile" not in security and "appArmorProfile" not in security  # the pod's RuntimeDefault
    assert {"cpu", "memory"} <= init["resources"]["limits"].keys()
    profile_dir = posixpath.join(KUBELET_SECCOMP_DIR, posixpath.dirname(SECCOMP_LOCALHOST_PROFILE))
    mounted = {m["mountPath"]: (m, volumes[m["name"]]) for m in init["volumeMounts"]}
    host_paths = [v["hostPath"] for _, v in mounted.values() if "hostPath" in v]
    assert host_paths == [{"path": profile_dir, "type": "DirectoryOrCreate"}]
    assert all(m.get("readOnly") for m, v in mounted.values() if "hostPath" not in v)
    assert not [m for m in agent["volumeMounts"] if "seccomp" in m["mountPath"]], "the agent never writes it"


def _project_config_map(directory: pathlib.Path, data: dict[str, str]) -> None:
    """A ConfigMap volume as kubelet lays it out: the files in a timestamped directory, "..data"
    pointing at it, and each name a symlink through "..data"."""
    payload = directory / "..2026_01_01_00_00_00.000000000"
    payload.mkdir(parents=True)
    (directory / "..data").symlink_to(payload.name)
    for name, text in data.items():
        (payload / name).write_text(text)
        (directory / name).symlink_to(f"..data/{name}")


def test_the_init_container_installs_the_profile_where_kubelet_reads_it(tmp_path):
    """Its command, run here as uid 0 with no capability at all, with each of its mounts a
    directory of the test's: the ConfigMap's profile ends up, whole, at the path the agent
    container's localhostProfile names, on a fresh node and over an older profile alike."""
    docs = render(OVERLAYS[0])
    pod = only(docs, "DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    init = init_container(docs)
    assert init["command"] == ["/bin/sh", "-c"]
    (script,) = init["args"]
    host_dir = None
    for mount in init["volumeMounts"]:
        local, volume = tmp_path / mount["name"], volumes[mount["name"]]
        if "configMap" in volume:
            config_map = next(d for d in docs if d["metadata"]["name"] == volume["configMap"]["name"])
            _project_config_map(local, config_map["data"])
        else:
            assert volume["hostPath"]["path"].startswith(KUBELET_SECCOMP_DIR + "/")
            local.mkdir()
            host_dir = local
        script = script.replace(mount["mountPath"], str(local))
    assert host_dir is not None and "/etc/" not in script and "/var/" not in script, script
    installed = host_dir / posixpath.basename(SECCOMP_LOCALHOST_PROFILE)
    for before in (None, "{} an older profile"):
        if before is not None:
            installed.write_text(before)
        result = subprocess.run([*setpriv_prefix(0, set()), "/bin/sh", "-c", script], capture_output=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert installed.read_bytes() == SECCOMP_PROFILE.read_bytes()
        assert sorted(os.listdir(host_dir)) == [installed.name], "a temporary file was left behind"


def misplaced_objects(docs: tuple[dict, ...]) -> list[str]:
    """Every rendered object not where it must be: namespaced ones outside vmctl-system,
    cluster-scoped ones with a namespace, and kinds this test has not classified."""
    wrong = []
    for doc in docs:
        kind, meta = doc["kind"], doc["metadata"]
        where = meta.get("namespace")
        if kind not in CLUSTER_SCOPED_KINDS | NAMESPACED_KINDS:
            wrong.append(f"{kind}/{meta['name']}: classify the kind as namespaced or cluster-scoped")
        elif kind in NAMESPACED_KINDS and where != NAMESPACE:
            wrong.append(f"{kind}/{meta['name']} is in {where or 'no namespace (kubectl puts it in default)'}")
        elif kind in CLUSTER_SCOPED_KINDS and where is not None:
            wrong.append(f"{kind}/{meta['name']} is cluster-scoped but names namespace {where}")
    return wrong


@pytest.mark.unprivileged
@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_every_namespaced_object_is_in_vmctl_system(overlay):
    docs = render(overlay)
    assert not misplaced_objects(docs)
    assert only(docs, "Namespace")["metadata"]["name"] == NAMESPACE


@pytest.mark.unprivileged
def test_the_namespace_check_catches_an_overlay_object_left_in_default(tmp_path):
    """The bug it guards against: the cluster-mtls overlay without its namespace line put the
    Service in default (the base's namespace covers only the base's objects)."""
    tree = tmp_path / "kubernetes"
    shutil.copytree(DEPLOY / "kubernetes", tree)
    kustomization = tree / "overlays" / "cluster-mtls" / "kustomization.yaml"
    text = kustomization.read_text()
    assert f"\nnamespace: {NAMESPACE}\n" in text
    kustomization.write_text(text.replace(f"\nnamespace: {NAMESPACE}\n", "\n"))
    assert misplaced_objects(render(tree / "overlays" / "cluster-mtls")) == [
        "Service/vmctl-agent is in no namespace (kubectl puts it in default)"
    ]


def admitted_ports(policy: dict) -> dict[int, list[dict]]:
    """port -> the namespace labels each NetworkPolicy rule admits to it."""
    admitted: dict[int, list[dict]] = {}
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "a rule without 'from' admits everyone"
        assert rule.get("ports"), "a rule without 'ports' admits to every port"
        for peer in rule["from"]:
            assert set(peer) == {"namespaceSelector"} and peer["namespaceSelector"]["matchLabels"], peer
            for port in rule["ports"]:
                assert port["protocol"] == "TCP"
                admitted.setdefault(port["port"], []).append(peer["namespaceSelector"]["matchLabels"])
    return admitted


@pytest.mark.unprivileged
@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_the_network_policy_admits_only_what_must_reach_each_port(overlay):
    """Not hostNetwork: the agent's ports are on the pod network, where every pod could reach them.
    Monitoring namespaces reach metrics, controller namespaces VmControl (cluster-mtls), and no pod
    the health port (kubelet probes come from the node, which network plugins admit)."""
    docs = render(overlay)
    daemonset, policy = only(docs, "DaemonSet"), only(docs, "NetworkPolicy")
    pod = daemonset["spec"]["template"]
    assert pod["spec"]["hostPID"] is True and not pod["spec"].get("hostNetwork")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ports = {p["name"]: p["containerPort"] for p in agent_container(docs)["ports"]}
    expected = {ports["metrics"]: [{"vmctl.dev/monitoring": "true"}]}
    if "grpc" in ports:
        expected[ports["grpc"]] = [{"vmctl.dev/controller": "true"}]
    sidecar = sidecar_container(docs)
    if sidecar is not None:  # the reclaim loop's metrics, to monitoring like the agent's; it has no other port
        (loop_metrics,) = sidecar["ports"]
        assert loop_metrics["name"] == "loop-metrics"
        expected[loop_metrics["containerPort"]] = [{"vmctl.dev/monitoring": "true"}]
    assert admitted_ports(policy) == expected
    assert ports["health"] not in admitted_ports(policy)


@pytest.mark.unprivileged
def test_node_local_has_no_network_access_to_vmcontrol():
    docs = render(next(p for p in OVERLAYS if p.name == "node-local"))
    assert not [d for d in docs if d["kind"] == "Service"]
    assert all(a.unix_path for a in _agent_args(docs).listen)


@pytest.mark.unprivileged
def test_cluster_overlay_discovery():
    docs = render(next(p for p in OVERLAYS if p.name == "cluster-mtls"))
    daemonset, service = only(docs, "DaemonSet"), only(docs, "Service")
    pod_labels = daemonset["spec"]["template"]["metadata"]["labels"]
    grpc_port = next(p["containerPort"] for p in agent_container(docs)["ports"] if p["name"] == "grpc")
    assert service["spec"]["clusterIP"] == "None"  # headless: DNS lists every agent
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {p["port"] for p in service["spec"]["ports"]} >= {grpc_port}
    assert service["metadata"]["namespace"] == daemonset["metadata"]["namespace"] == NAMESPACE


@pytest.mark.unprivileged
@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_a_resource_quota_admits_the_priority_class_in_the_namespace(overlay):
    """system-node-critical outside kube-system needs a quota scoped to it where the API server
    limits the class (GKE; --admission-control-config-file with limitedResources)."""
    docs = render(overlay)
    priority = only(docs, "DaemonSet")["spec"]["template"]["spec"]["priorityClassName"]
    quota = only(docs, "ResourceQuota")
    assert quota["metadata"]["namespace"] == NAMESPACE
    (expression,) = quota["spec"]["scopeSelector"]["matchExpressions"]
    assert expression == {"scopeName": "PriorityClass", "operator": "In", "values": [priority]}
    # Only a pod count, and one far above any node count: a cpu or memory entry would make every
    # pod of the class state requests for it, and a low count would leave nodes without an agent.
    assert set(quota["spec"]["hard"]) == {"pods"} and int(quota["spec"]["hard"]["pods"]) >= 100_000


# ---- the agent's listeners: IPv6 and IPv4 ---------------------------------------------------


@pytest.mark.unprivileged
@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_listeners_bind_every_address_family(overlay):
    args = _agent_args(render(overlay))
    assert args.health_listen == ("::", HEALTH_PORT) and args.metrics_listen == ("::", METRICS_PORT)
    tcp = [a.text for a in args.listen if a.unix_path is None]
    assert tcp in ([], [f"tcp://[::]:{VMCONTROL_PORT}"])


def test_the_agent_serves_the_overlays_listen_addresses_over_ipv4_and_ipv6(start_agent, target, tmp_path):
    """The cluster-mtls overlay's listen addresses, given to a real agent (ports made free ones),
    answer on ::1 and 127.0.0.1 alike: health, metrics and mutual TLS (dual-stack sockets)."""
    docs = render(next(p for p in OVERLAYS if p.name == "cluster-mtls"))
    rig = Rig.create(tmp_path / "rig")
    args = _agent_args(docs)
    hosts = {
        "health": f"[{args.health_listen[0]}]:0",
        "metrics": f"[{args.metrics_listen[0]}]:0",
        "tcp": next(a.text for a in args.listen if a.unix_path is None).replace(
            f":{VMCONTROL_PORT}", f":{rig.tcp_port}"
        ),
    }
    assert hosts == {"health": "[::]:0", "metrics": "[::]:0", "tcp": f"tcp://[::]:{rig.tcp_port}"}
    agent = start_agent(
        *("--health-listen", hosts["health"], "--metrics-listen", hosts["metrics"], "--log-format", "json"),
        *("--listen", hosts["tcp"], "--tls-cert", rig.server.cert, "--tls-key", rig.server.key),
        *("--client-ca", rig.pki.ca, "--policy", str(rig.policy_path)),
    )
    exercise_operations(agent.log())  # health and metrics, each over 127.0.0.1 and ::1
    exercise_tls(rig, target)  # mutual TLS over 127.0.0.1 and ::1


def _policy_of(docs: tuple[dict, ...]) -> Policy:
    config_map = next(d for d in docs if d["metadata"]["name"].startswith("vmctl-policy-"))
    return parse_policy(config_map["data"]["policy.yaml"], "policy.yaml")


@pytest.mark.unprivileged
@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_policy_configmap_is_a_policy_the_agent_accepts(overlay):
    """The ConfigMap's file, through the agent's own policy parser (the one --policy uses)."""
    docs = render(overlay)
    policy = _policy_of(docs)
    assert policy.require_cookie is True
    expected = {"node-root", "reclaimer", "observer"} | ({"autoreclaim"} if sidecar_container(docs) else set())
    assert {rule.name for rule in policy.rules} == expected
    args = _agent_args(docs)
    mount = next(m for m in agent_container(docs)["volumeMounts"] if m["name"] == "policy")
    assert args.policy == f"{mount['mountPath']}/policy.yaml"


# ---- the autoreclaim overlay: the reclaim loop beside the agent -------------------------------------

AUTORECLAIM = next(p for p in OVERLAYS if p.name == "autoreclaim")
SIDECAR_UID = 65532
MiB = 1 << 20


def _sidecar_args(docs: tuple[dict, ...]) -> argparse.Namespace:
    """The sidecar's command, parsed by vmctl's own parser: an unknown or malformed flag exits here."""
    sidecar = sidecar_container(docs)
    assert sidecar is not None
    assert sidecar["command"] == ["vmctl"], "the client's console script, from the agent's image"
    return vmctl_parser().parse_args(sidecar["args"])


@pytest.mark.unprivileged
@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_only_the_autoreclaim_overlay_runs_a_container_beside_the_agent(overlay):
    docs = render(overlay)
    containers = only(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    expected = [AGENT, "autoreclaim"] if overlay == AUTORECLAIM else [AGENT]
    assert [c["name"] for c in containers] == expected


@pytest.mark.unprivileged
def test_the_reclaim_sidecar_holds_no_privilege():
    docs = render(AUTORECLAIM)
    sidecar = sidecar_container(docs)
    assert sidecar is not None and sidecar["image"] == agent_container(docs)["image"]
    security = sidecar["securityContext"]
    assert security["runAsUser"] == SIDECAR_UID and security["runAsNonRoot"] is True
    assert security["runAsGroup"] != 0
    assert security["capabilities"] == {"drop": ["ALL"]}, "no capability added"
    assert security["privileged"] is False and security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert security["appArmorProfile"] == {"type": "RuntimeDefault"}
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= sidecar["resources"][kind].keys()
    assert not any(p.get("hostPort") for p in sidecar.get("ports", []))
    # Its only host path is the agent's socket directory, read-only (connecting to a socket needs no write
    # access to the filesystem it is on); everything else it may write is a small emptyDir.
    pod = only(docs, "DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in sidecar["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "hostPath" in volume:
            assert volume["hostPath"]["path"] == "/run/vmctl" and mount["readOnly"] is True
        else:
            assert "emptyDir" in volume and volume["emptyDir"].get("sizeLimit"), mount


@pytest.mark.unprivileged
def test_the_reclaim_sidecar_runs_autoreclaim_against_the_agents_socket():
    docs = render(AUTORECLAIM)
    args, agent_args = _sidecar_args(docs), _agent_args(docs)
    assert args.command == "autoreclaim"
    (socket_path,) = [a.unix_path for a in agent_args.listen if a.unix_path]
    assert args.target == [f"unix://{socket_path}"]
    assert args.output == "json" and not args.dry_run
    assert args.cgroup and all(c.startswith("/kubepods") for c in args.cgroup), "pods only"
    sidecar = sidecar_container(docs)
    assert sidecar is not None
    mounted = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    agent_mounts = {m["mountPath"]: m["name"] for m in agent_container(docs)["volumeMounts"]}
    directory = posixpath.dirname(socket_path)
    assert mounted[directory] == agent_mounts[directory], "the same volume as the agent's socket"
    assert args.metrics_listen == ("::", sidecar["ports"][0]["containerPort"])


@pytest.mark.unprivileged
def test_the_agents_socket_admits_the_sidecars_group_and_no_one_else():
    """A unix socket takes its creator's group: the agent's primary group is the sidecar's, and the
    socket mode lets that group (and root) connect, not others."""
    docs = render(AUTORECLAIM)
    agent_args = _agent_args(docs)
    sidecar = sidecar_container(docs)
    assert sidecar is not None
    assert agent_args.socket_mode == 0o660
    assert agent_container(docs)["securityContext"]["runAsGroup"] == sidecar["securityContext"]["runAsGroup"]
    assert agent_container(docs)["securityContext"].get("runAsUser", 0) == 0, "still root, for its capabilities"
    for other in OVERLAYS:
        if other != AUTORECLAIM:
            assert _agent_args(render(other)).socket_mode == 0o600


def _rules_naming(policy: Policy, identities: set[str]) -> list:
    return [rule for rule in policy.rules if rule.identities & identities]


@pytest.mark.unprivileged
def test_the_policy_grants_the_sidecar_exactly_what_the_loop_needs():
    """read (ListProcesses, GetNodeInfo, GetVmaInfo) and advise with pageout (and cold only with
    --cold-unaccessed) on exactly the cgroups the loop is given; no other rule names its uid or group;
    every other rule is the base policy's, unchanged."""
    docs = render(AUTORECLAIM)
    args = _sidecar_args(docs)
    sidecar = sidecar_container(docs)
    assert sidecar is not None
    gid = sidecar["securityContext"]["runAsGroup"]
    policy = _policy_of(docs)
    (rule,) = _rules_naming(policy, {f"uid:{SIDECAR_UID}", f"gid:{gid}"})
    assert rule.identities == {f"uid:{SIDECAR_UID}"}, "the uid alone: the group is the agent's too"
    assert rule.verbs == {READ, ADVISE}
    assert rule.advices == ({"pageout", "cold"} if args.cold_unaccessed else {"pageout"})
    assert rule.targets is not None and set(rule.targets.cgroup_prefixes) == set(args.cgroup)
    assert not rule.targets.uids and not rule.targets.comm
    base = parse_policy((KUSTOMIZE_BASE / "policy.yaml").read_text(), "base/policy.yaml")
    assert [r for r in policy.rules if r is not rule] == list(base.rules)
    assert (policy.require_cookie, policy.protected_pids, policy.protected_comm, policy.protected_cgroup_prefixes) == (
        base.require_cookie,
        base.protected_pids,
        base.protected_comm,
        base.protected_cgroup_prefixes,
    )

    # And as the agent decides, for the sidecar's identity on the socket:
    caller = Caller(f"uid:{SIDECAR_UID}", "unix", uid=SIDECAR_UID, gid=gid, pid=4242)

    def target(cgroup: str) -> Target:
        return Target(pid=4343, uid=1000, comm="redis-server", cgroup=cgroup, start_time=1, owner=1000)

    policy.check_verb(caller, READ)
    policy.check_verb(caller, ADVISE)
    for prefix in args.cgroup:
        pod = target(f"{prefix}/pod1234/cri-containerd-abcd")
        assert policy.check_target(caller, ADVISE, pod, "pageout") is rule
        assert policy.check_target(caller, READ, pod) is rule
        for advice in ("willneed", "collapse", *(() if args.cold_unaccessed else ("cold",))):
            with pytest.raises(PolicyDenied):
                policy.check_target(caller, ADVISE, pod, advice)
    for elsewhere in ("/kubepods.slice/kubepods-burstable.slice/pod1", "/kubepods/burstable/pod1",
                      "/system.slice/kubelet.service", "/kubepods-evil"):  # fmt: skip
        for verb in (READ, ADVISE):
            with pytest.raises(PolicyDenied):
                policy.check_target(caller, verb, target(elsewhere), "pageout" if verb == ADVISE else None)
    assert not policy.reads_any_process(caller)


def _as_user(uid: int, gid: int) -> list[str]:
    """What the container runtime does for the sidecar: that uid and group, no capabilities."""
    setpriv = require_tool("setpriv", "util-linux")
    return [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--inh-caps=-all", "--no-new-privs", "--"]


@pytest.mark.skipif(CGROUP2 is None, reason="no cgroup v2 hierarchy is mounted")
def test_the_sidecar_as_deployed_pages_out_an_idle_pod_through_the_agent_as_deployed(
    start_agent, spawn_target, zram_swap, tmp_path
):
    """The overlay's pieces together, for real: the agent with the overlay's policy, socket mode and
    group; the sidecar's own command (only its pace made quick, and no metrics port) as its uid and
    group. An idle process in a best-effort pod's cgroup is paged out; the same uid without the group
    cannot reach the socket, and another uid in the group may not even list processes."""
    docs = render(AUTORECLAIM)
    sidecar = sidecar_container(docs)
    assert sidecar is not None
    uid, gid = sidecar["securityContext"]["runAsUser"], sidecar["securityContext"]["runAsGroup"]
    agent_args = _agent_args(docs)
    policy_path = tmp_path / "policy.yaml"
    config_map = next(d for d in docs if d["metadata"]["name"].startswith("vmctl-policy-"))
    policy_path.write_text(config_map["data"]["policy.yaml"])
    loop_args = _sidecar_args(docs)
    pod_cgroup = f"{loop_args.cgroup[-1]}/pod-vmctl-test-{os.getpid()}"
    idle = spawn_target()
    start, _ = idle.map_anon(16 * MiB, seed=77)
    in_group = [require_tool("setpriv", "util-linux"), f"--regid={gid}", "--clear-groups", "--"]  # uid 0 still
    with public_directory() as sockets, _cgroup_path(pod_cgroup) as pod:
        mode = f"--socket-mode={agent_args.socket_mode:o}"
        agent = start_agent("--policy", str(policy_path), mode, socket_dir=sockets, prefix=in_group)
        assert (agent.socket_path.stat().st_gid, agent.socket_path.stat().st_mode & 0o777) == (gid, 0o660)
        (pod / "cgroup.procs").write_text(str(idle.pid))
        command = [a.replace("unix:///run/vmctl/agent.sock", agent.address) for a in sidecar["args"]]
        command = [a for a in command if not a.startswith("--metrics-listen")]
        assert agent.address in command[0]
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        quick = ["--idle-seconds", "1", "--interval", "0.5", "--duration", "4"]
        run = subprocess.run(
            [*_as_user(uid, gid), *VMCTL, *command, *quick], capture_output=True, text=True, timeout=120, env=env
        )
        assert run.returncode == 0, run.stderr
        lines = [json.loads(line) for line in run.stdout.splitlines()]
        pageouts = [e for e in lines if e["event"] == "pageout"]
        assert [e["pid"] for e in pageouts] == [idle.pid], lines
        assert lines[-1]["event"] == "summary" and lines[-1]["errors"] == 0, lines[-1]
        assert idle.smaps_region(start)["Swap"] >= 15 * 1024
        ps = ["--target", agent.address, "ps", "-o", "json"]
        outside_group = subprocess.run(
            [*_as_user(uid, 65534), *VMCTL, *ps], capture_output=True, text=True, timeout=60, env=env
        )
        assert outside_group.returncode == 1, outside_group
        assert "may not connect to the agent's socket" in json.loads(outside_group.stdout)["error"]["message"]
        other_uid = subprocess.run(
            [*_as_user(uid + 1, gid), *VMCTL, *ps], capture_output=True, text=True, timeout=60, env=env
        )
        assert other_uid.returncode == 1, other_uid
        assert json.loads(other_uid.stdout)["error"]["reason"] == "POLICY_DENIED"
    idle.verify()


@contextlib.contextmanager
def _cgroup_path(path: str) -> Iterator[pathlib.Path]:
    """The cgroup v2 directory ``path`` and any missing parents; those made here are removed after."""
    assert CGROUP2 is not None
    made: list[pathlib.Path] = []
    current = CGROUP2
    try:
        for part in path.strip("/").split("/"):
            current = current / part
            if not current.exists():
                current.mkdir()
                made.append(current)
        yield current
    finally:
        for directory in reversed(made):
            wait_for(lambda d=directory: _emptied_and_removed(d), f"cgroup {directory} to be removed")


# ---- container image -------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    instructions, pending = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _console_scripts() -> dict[str, str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


@pytest.mark.unprivileged
def test_dockerfile_is_multi_stage_pinned_and_runs_the_agent():
    instructions = _dockerfile_instructions()
    bases = [rest.split()[0] for keyword, rest in instructions if keyword == "FROM"]
    assert len(bases) == 2, "a build stage and a runtime stage"
    for image in bases:
        assert "latest" not in image
        pinned_tag = re.fullmatch(r"python:\d+\.\d+\.\d+-slim-[a-z]+", image)
        assert pinned_tag or re.search(r"@sha256:[0-9a-f]{64}$", image), f"{image} is not pinned"
    stages = " ".join(f"{k} {r}" for k, r in instructions).split("FROM ")[1:]
    assert "gcc" in stages[0] and "pip wheel" in stages[0], "the extension is compiled in the build stage"
    assert "VMCTL_NATIVE=required pip wheel" in stages[0], "a build without the extension must fail, not go pure"
    assert "'.[agent]'" in stages[0] and "'vmctl[agent]'" in stages[1], "the agent's extra, built and installed"
    assert "gcc" not in stages[1] and "--from=build" in stages[1], "the runtime gets wheels, not a compiler"
    for keyword, rest in instructions:
        assert keyword != "ADD", "COPY only: no remote or auto-extracting ADD"
        if keyword == "RUN":
            assert not re.search(r"\b(curl|wget)\b", rest), "nothing fetched outside the package managers"
    entrypoints = [json.loads(rest) for keyword, rest in instructions if keyword == "ENTRYPOINT"]
    assert len(entrypoints) == 1 and isinstance(entrypoints[0], list), "exec form"
    assert entrypoints[0] == ["vmctl-agent"]
    assert _console_scripts()["vmctl-agent"] == "vmctl_server.agent:main"
    cmd = [json.loads(rest) for keyword, rest in instructions if keyword == "CMD"][-1]
    agent_cli.build_parser().parse_args(cmd)


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parents = [str(p) for p in reversed(pathlib.PurePosixPath(path).parents) if str(p) != "."]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.removeprefix("!").rstrip("/")
        if any(fnmatch.fnmatchcase(candidate, glob) for candidate in [*parents, path]):
            ignored = not negate
    return ignored


def test_the_build_context_builds_a_wheel_with_the_extension_and_the_agent(tmp_path):
    """Stage one for real, minus the network: the files the Dockerfile COPYs, after
    .dockerignore, build (VMCTL_NATIVE=required, as there) an abi3 wheel holding the compiled
    extension and vmctl-agent."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    context = [path for path in tracked if not _dockerignored(path, patterns)]
    assert not _dockerignored("src/vmctl_server/agent.py", patterns)
    assert _dockerignored("src/vmctl_server/_native.abi3.so", patterns), "the host's build must stay out"
    build_stage = _dockerfile_instructions()[: [k for k, _ in _dockerfile_instructions()].index("FROM", 1)]
    copied = [rest.split()[:-1] for keyword, rest in build_stage if keyword == "COPY"]
    source = tmp_path / "src-tree"
    for sources in copied:
        for src in sources:
            matched = [p for p in context if p == src or p.startswith(src.rstrip("/") + "/")]
            assert matched, f"COPY {src}: not in the build context"
            for path in matched:
                (source / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / path, source / path)
    wheels = tmp_path / "wheels"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), "."],
        cwd=source,
        env=dict(os.environ, VMCTL_NATIVE="required"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = wheels.glob("vmctl-*.whl")
    assert wheel.name.endswith(f"-cp310-abi3-linux_{os.uname().machine}.whl"), wheel.name
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert any(re.fullmatch(r"vmctl_server/backends/native/_native\..*\.so", n) for n in names), names
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "vmctl-agent = vmctl_server.agent:main" in entry_points


# ---- systemd ---------------------------------------------------------------------


def _unit_for_this_host(tmp_path: pathlib.Path, text: str | None = None) -> pathlib.Path:
    """The unit with ExecStart pointing at this checkout's vmctl-agent:
    systemd-analyze verify checks that the binary exists and is executable."""
    agent_binary = pathlib.Path(sys.executable).parent / "vmctl-agent"
    assert agent_binary.exists(), f"{agent_binary}: run make setup"
    unit = tmp_path / UNIT.name
    unit.write_text((text or UNIT.read_text()).replace("/opt/vmctl/bin/vmctl-agent", str(agent_binary)))
    return unit


def _verify(unit: pathlib.Path) -> subprocess.CompletedProcess:
    analyze = require_tool("systemd-analyze", "systemd")
    return subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)


@pytest.mark.unprivileged
def test_systemd_unit_verifies_cleanly(tmp_path):
    result = _verify(_unit_for_this_host(tmp_path))
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    # systemd-analyze only warns about unknown keys and bad values, so warnings are failures here;
    # this shows they are seen.
    broken = UNIT.read_text().replace("ProtectSystem=strict", "ProtectSystem=strictest")
    assert "protect system value" in _verify(_unit_for_this_host(tmp_path, broken)).stderr


@pytest.mark.unprivileged
def test_systemd_unit_exposure_is_low(tmp_path):
    analyze = require_tool("systemd-analyze", "systemd")
    unit = _unit_for_this_host(tmp_path)
    review = [analyze, "security", "--offline=yes", "--no-pager", str(unit)]
    result = subprocess.run([*review, "--threshold=25"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr  # "2.5 OK" or better on systemd's 0-10 scale


@pytest.mark.unprivileged
def test_systemd_unit_matches_the_agent_cli_and_the_daemonset():
    settings = unit_settings()
    exec_start = settings["ExecStart"][0].split()
    assert exec_start[0].endswith("/vmctl-agent")
    args = agent_cli.build_parser().parse_args(exec_start[1:])
    assert [a.unix_path for a in args.listen] == ["/run/vmctl/agent.sock"]
    assert args.cookie_key_file.startswith("/var/lib/vmctl/") and settings["StateDirectory"] == ["vmctl"]
    assert settings["RuntimeDirectory"] == ["vmctl"]
    assert args.metrics_listen[0] == "127.0.0.1", "metrics stay on the host unless opened on purpose"
    unit_caps = {c.removeprefix("CAP_") for c in settings["AmbientCapabilities"][0].split()}
    assert unit_caps == set(settings["CapabilityBoundingSet"][0].replace("CAP_", "").split()) == CAPABILITIES
    for setting in ("ProtectProc", "ProcSubset", "PrivateUsers"):
        assert setting not in settings, f"{setting}= would hide processes or void the capabilities"
