#!/usr/bin/env python3
"""Consistency checks of deploy/ that a schema cannot make (run by scripts/check-deploy.sh).

kubernetes-validate checks each object against the Kubernetes JSON schema; this checks how the
objects fit together and with Kura's configuration, offline:
  - YAML without duplicate keys; every object named, namespaced objects in one namespace, no
    (kind, name) twice; kustomization.yaml lists exactly the top-level manifests, and the
    Secret templates under deploy/secrets/ are left out of it;
  - the StatefulSet's selector, serviceName (a headless Service), volumes, ConfigMap and Secret
    references, named probe ports; Services, PodDisruptionBudget and NetworkPolicy select its pods;
  - kura.toml in the ConfigMap: every key exists in config/kura.toml with the same value type,
    listen ports match the container ports, the discovery name is the headless Service's FQDN,
    the TLS files and the --config file are where the mounts put them, the grace period
    outlasts the preStop sleep plus shutdown.drain_timeout, and no KURA_* ENV of the image
    (which wins over the file) contradicts the file.
Usage: check-deploy-refs.py REPO_ROOT
"""

import pathlib
import re
import sys

import yaml

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

CLUSTER_SCOPED = {"Namespace", "StorageClass", "ClusterRole", "ClusterRoleBinding", "PersistentVolume"}

errors = []


def fail(where, what):
    errors.append(f"{where}: {what}")


class UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a mapping with the same key twice (PyYAML keeps the last)."""


def _unique_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_documents(path, root):
    try:
        return [d for d in yaml.load_all(path.read_text(), Loader=UniqueKeyLoader) if d is not None]
    except yaml.YAMLError as e:
        fail(path.relative_to(root), f"invalid YAML: {e}")
        return []


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def duration_seconds(text):
    m = re.fullmatch(r"(\d+)(ms|s|m|h)", text)
    if not m:
        return None
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def reference_keys(path):
    """section.key -> a value of the right type, from config/kura.toml (commented keys too)."""
    keys, section = {}, None
    for line in path.read_text().splitlines():
        m = re.match(r"^\[([a-z_.]+)\]", line)
        if m:
            section = m.group(1)
            continue
        m = re.match(r"^#?\s?([a-z_]+\s*=\s.*)$", line)
        if m and section:
            try:
                parsed = tomllib.loads(m.group(1))
            except tomllib.TOMLDecodeError:
                continue
            for key, value in parsed.items():
                keys[f"{section}.{key}"] = value
    return keys


def flatten(table, prefix=""):
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from flatten(value, name + ".")
        else:
            yield name, value


def check_toml(where, text, reference):
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        fail(where, f"kura.toml is not valid TOML: {e}")
        return {}
    for key, value in flatten(config):
        if key not in reference:
            fail(where, f"kura.toml: {key} is not a key of config/kura.toml")
        elif type(value) is not type(reference[key]):
            fail(where, f"kura.toml: {key} is a {type(value).__name__}, "
                        f"config/kura.toml has a {type(reference[key]).__name__}")
    return config


def main(root):
    deploy = root / "deploy"
    reference = reference_keys(root / "config" / "kura.toml")
    if len(reference) < 40:
        fail("config/kura.toml", f"only {len(reference)} keys found: the parser here needs a look")

    objects = {}  # (kind, name) -> (path, object)
    namespaces = set()
    manifests = sorted(p for p in deploy.rglob("*.yaml") if p.name != "kustomization.yaml")
    for path in manifests:
        rel = path.relative_to(root)
        for obj in load_documents(path, root):
            if not isinstance(obj, dict) or not obj.get("kind") or not obj.get("apiVersion"):
                fail(rel, "a document without apiVersion and kind")
                continue
            kind, meta = obj["kind"], obj.get("metadata") or {}
            name = meta.get("name")
            if not name:
                fail(rel, f"a {kind} without metadata.name")
                continue
            if (kind, name) in objects:
                fail(rel, f"{kind}/{name} is also defined in {objects[(kind, name)][0]}")
            objects[(kind, name)] = (rel, obj)
            if kind in CLUSTER_SCOPED:
                continue
            if not meta.get("namespace"):
                fail(rel, f"{kind}/{name} has no metadata.namespace")
            namespaces.add(meta.get("namespace"))
            in_templates = path.parent.name == "secrets"
            if in_templates != (kind == "Secret"):
                fail(rel, "Secrets (and only Secrets) belong under deploy/secrets/, as templates")
    if len(namespaces) > 1:
        fail("deploy/", f"objects in several namespaces: {sorted(map(str, namespaces))}")
    namespace = next(iter(namespaces), None)
    namespace_objects = [n for (k, n) in objects if k == "Namespace"]
    if namespace_objects and namespace not in namespace_objects:
        fail("deploy/", f"the Namespace object(s) {namespace_objects} are not {namespace!r}")

    def named(kind):
        return {n: o for (k, n), (_, o) in objects.items() if k == kind}

    # kustomization.yaml lists exactly the top-level manifests.
    kustomization = deploy / "kustomization.yaml"
    if kustomization.exists():
        docs = load_documents(kustomization, root)
        listed = list((docs[0] or {}).get("resources") or []) if docs else []
        for resource in listed:
            if not (deploy / resource).is_file():
                fail("deploy/kustomization.yaml", f"lists {resource}, which does not exist")
            elif (deploy / resource).parent != deploy:
                fail("deploy/kustomization.yaml", f"lists {resource}: Secret templates stay out")
        for path in manifests:
            if path.parent == deploy and path.name not in listed:
                fail("deploy/kustomization.yaml", f"does not list {path.name}")

    statefulsets = named("StatefulSet")
    baked_env = image_env(root / "Dockerfile")
    if not statefulsets and not errors:
        fail("deploy/", "no StatefulSet")
    for name, sts in statefulsets.items():
        where = f"StatefulSet/{name}"
        try:
            check_statefulset(where, sts, namespace, named, reference, baked_env)
        except (KeyError, TypeError, AttributeError, ValueError, IndexError) as e:
            fail(where, f"cannot be checked, malformed ({type(e).__name__}: {e}); see the schema errors above")

    for error in errors:
        print(f"ERROR {error}")
    print(f"{len(objects)} objects checked for consistency, {len(errors)} problem(s)")
    return 1 if errors else 0


def check_statefulset(where, sts, namespace, named, reference, image_env):
    """The StatefulSet against the other objects and its kura.toml."""
    services, secrets, configmaps = named("Service"), named("Secret"), named("ConfigMap")
    spec = sts["spec"]
    template = spec["template"]
    labels = (template.get("metadata") or {}).get("labels") or {}
    pod = template["spec"]
    if not matches(spec["selector"].get("matchLabels"), labels):
        fail(where, "spec.selector.matchLabels does not select the pod template's labels")

    peers = services.get(spec.get("serviceName"))
    if peers is None:
        fail(where, f"serviceName {spec.get('serviceName')!r} is not a Service in deploy/")
    elif peers["spec"].get("clusterIP") != "None":
        fail(where, f"serviceName {spec['serviceName']!r} is not headless (clusterIP: None)")

    for kind, obj in [("Service", s) for s in services.values()] + [
        (k, o) for k in ("PodDisruptionBudget", "NetworkPolicy") for o in named(k).values()
    ]:
        selector = obj["spec"].get("selector") if kind == "Service" else (
            obj["spec"].get("selector") or obj["spec"].get("podSelector") or {}
        ).get("matchLabels")
        if not matches(selector, labels):
            fail(f"{kind}/{obj['metadata']['name']}", f"its selector does not select {where}'s pods")

    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    claims = {c["metadata"]["name"] for c in spec.get("volumeClaimTemplates") or []}
    for volume in volumes.values():
        if "configMap" in volume and volume["configMap"]["name"] not in configmaps:
            fail(where, f"volume {volume['name']}: no ConfigMap {volume['configMap']['name']}")
        if "secret" in volume and volume["secret"]["secretName"] not in secrets:
            fail(where, f"volume {volume['name']}: no Secret template {volume['secret']['secretName']}")

    all_ports = {p.get("name"): p["containerPort"] for c in pod["containers"] for p in c.get("ports") or []}
    for svc in services.values():
        for sport in svc["spec"]["ports"]:
            target = sport.get("targetPort", sport["port"])
            if target not in (all_ports if isinstance(target, str) else all_ports.values()):
                fail(f"Service/{svc['metadata']['name']}", f"targetPort {target!r} is not a container port of {where}")

    for container in pod["containers"]:
        cwhere = f"{where} container {container['name']}"
        ports = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
        mounts = {}
        for mount in container.get("volumeMounts") or []:
            if mount["name"] not in volumes and mount["name"] not in claims:
                fail(cwhere, f"volumeMount {mount['name']} has no volume or volumeClaimTemplate")
            mounts[mount["mountPath"].rstrip("/")] = volumes.get(mount["name"], {})
        for env in container.get("env") or []:
            ref = (env.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                data = secrets.get(ref["name"])
                if data is None:
                    fail(cwhere, f"env {env['name']}: no Secret template {ref['name']}")
                elif ref["key"] not in {**(data.get("data") or {}), **(data.get("stringData") or {})}:
                    fail(cwhere, f"env {env['name']}: Secret {ref['name']} has no key {ref['key']}")
        for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
            port = ((container.get(probe_name) or {}).get("httpGet") or {}).get("port")
            if isinstance(port, str) and port not in ports:
                fail(cwhere, f"{probe_name} uses port {port!r}, not a named container port")

        def mounted_file(path):
            """The (volume, key) a file path inside the container comes from, if any."""
            parent, _, key = path.rpartition("/")
            volume = mounts.get(parent)
            return (volume, key) if volume is not None else (None, None)

        def volume_has(volume, key):
            if "configMap" in volume:
                return key in (configmaps.get(volume["configMap"]["name"]) or {}).get("data", {})
            if "secret" in volume:
                secret = secrets.get(volume["secret"]["secretName"]) or {}
                return key in {**(secret.get("data") or {}), **(secret.get("stringData") or {})}
            return False

        args = (container.get("command") or []) + (container.get("args") or [])
        config_path = args[args.index("--config") + 1] if "--config" in args[:-1] else None
        if config_path is None:
            fail(cwhere, "no --config argument")
            continue
        volume, key = mounted_file(config_path)
        if not volume or "configMap" not in volume or not volume_has(volume, key):
            fail(cwhere, f"--config {config_path} is not a key of a mounted ConfigMap")
            continue
        text = configmaps[volume["configMap"]["name"]]["data"][key]
        config = check_toml(f"ConfigMap/{volume['configMap']['name']}", text, reference)

        server = config.get("server") or {}
        for listen, port_name in (("http", "http"), ("grpc", "grpc"), ("internal", "peer")):
            address = server.get(listen)
            if not address:
                fail(cwhere, f"kura.toml sets no server.{listen}")
            elif not re.fullmatch(r"(0\.0\.0\.0|\[::\]):\d+", address):
                fail(cwhere, f"kura.toml server.{listen} = {address!r} is not a wildcard address")
            elif int(address.rsplit(":", 1)[1]) != ports.get(port_name):
                fail(cwhere, f"kura.toml server.{listen} = {address!r}, but container port {port_name} is {ports.get(port_name)!r}")

        data_dir = (config.get("storage") or {}).get("data_dir", "")
        claim_mounts = {m["mountPath"].rstrip("/") for m in container.get("volumeMounts") or [] if m["name"] in claims}
        if data_dir.rstrip("/") not in claim_mounts:
            fail(cwhere, f"storage.data_dir {data_dir!r} is not a volumeClaimTemplate's mount")

        dns_name = ((config.get("replication") or {}).get("discovery") or {}).get("dns_name")
        if peers is not None and dns_name != f"{spec['serviceName']}.{namespace}.svc.cluster.local":
            fail(cwhere, f"replication.discovery.dns_name {dns_name!r} is not the headless Service's FQDN")

        tls = (config.get("replication") or {}).get("tls") or {}
        for field in ("ca", "cert", "key"):
            volume, key = mounted_file(tls.get(field, ""))
            if not volume or "secret" not in volume or not volume_has(volume, key):
                fail(cwhere, f"replication.tls.{field} {tls.get(field)!r} is not a key of a mounted Secret")

        drain = duration_seconds(((config.get("shutdown") or {}).get("drain_timeout")) or "60s")
        command = " ".join(((container.get("lifecycle") or {}).get("preStop") or {}).get("exec", {}).get("command") or [])
        if "kill -USR1 1" not in command:
            fail(cwhere, "preStop does not start a drain (kill -USR1 1)")
        sleep = sum(int(s) for s in re.findall(r"\bsleep (\d+)", command))
        grace = pod.get("terminationGracePeriodSeconds", 30)
        # The node may take 5 s more after the drain for connections to close (src/node.rs),
        # and 1 s for its blocking threads (src/main.rs).
        if drain is None or grace <= sleep + drain + 6:
            fail(where, f"terminationGracePeriodSeconds {grace} must exceed the preStop sleep "
                        f"({sleep}s) plus shutdown.drain_timeout ({drain}s) plus the node's 6s "
                        f"for connections and threads to close")

        # KURA_* variables win over the file: the image's ENV must not silently override it.
        own_env = {e["name"] for e in container.get("env") or []}
        settings = dict(flatten(config))
        for name, value in image_env.items():
            key = env_key(name, reference)
            if name not in own_env and key in settings and str(settings[key]) != value:
                fail(cwhere, f"kura.toml sets {key} = {settings[key]!r}, but the image's "
                             f"ENV {name}={value} overrides it")


def image_env(dockerfile):
    """KURA_* variables the Dockerfile's final stage sets with ENV."""
    stages = re.split(r"(?im)^FROM\s", dockerfile.read_text())
    text = stages[-1].replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if re.match(r"(?i)^\s*ENV\s", line):
            for name, value in re.findall(r"\b(KURA_[A-Z0-9_]+)=(\"[^\"]*\"|\S+)", line):
                env[name] = value.strip('"')
    return env


def env_key(name, reference):
    """KURA_REPLICATION_DISCOVERY_DNS_NAME -> replication.discovery.dns_name (longest section first)."""
    sections = sorted({k.rsplit(".", 1)[0] for k in reference}, key=len, reverse=True)
    rest = name.removeprefix("KURA_")
    for section in sections:
        prefix = section.replace(".", "_").upper() + "_"
        if rest.startswith(prefix) and len(rest) > len(prefix):
            return f"{section}.{rest[len(prefix):].lower()}"
    return None


if __name__ == "__main__":
    sys.exit(main(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()))
