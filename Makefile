# bpfpoly — the two newcomer commands are `make run` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
export PATH := $(HOME)/.cargo/bin:$(PATH)

CARGO ?= cargo
RUN_DIR := $(CURDIR)/.run
KUBECONFIG_LOCAL := $(RUN_DIR)/cluster/kubeconfig

.PHONY: all deps build ebpf crds lint unit cluster-up cluster-down cluster-bare node-up node-down node-test api-test test run stop e2e kernels bench fuzz chaos soak chart-test clean

all: build

## deps: install the apt packages, Python wheels and caches the project needs (idempotent)
deps:
	bash e2e/env/install-deps.sh

## ebpf: build the C eBPF objects into ebpf/build/*.o
ebpf:
	$(MAKE) -C ebpf

## build: the eBPF objects and the Rust workspace
build: ebpf
	$(CARGO) build --workspace --release

## crds: regenerate the CRD YAML (crds/ and charts/bpfpoly/crds/)
crds:
	$(CARGO) run -q -p bpfpoly-operator -- crdgen > crds/bpfpoly.io_crds.yaml
	cp crds/bpfpoly.io_crds.yaml charts/bpfpoly/crds/bpfpoly.io_crds.yaml

## lint: rustfmt and clippy with -D warnings
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## unit: unit and property tests (no cluster needed)
unit: ebpf
	$(CARGO) test --workspace

## cluster-up / cluster-down: the local single-node cluster, Kubernetes 1.20 built from Debian's
## source: etcd + kube-apiserver on loopback, then containerd, the CNI bridge, the kubelet (node
## `local`), kube-proxy, controller-manager and scheduler (e2e/env/node.sh). down stops all of it by
## PID and removes what it made (containers, mounts, bridge, iptables rules).
cluster-up:
	bash e2e/env/cluster.sh up
	bash e2e/env/node.sh up

cluster-down:
	bash e2e/env/node.sh down
	bash e2e/env/cluster.sh down

## cluster-bare: etcd + kube-apiserver only, no node: what api-test and chart-test run on (their
## simulated Nodes and never-started Pods must not meet a kubelet or a controller-manager)
cluster-bare:
	@if bash e2e/env/node.sh running; then \
	  echo "[bpfpoly] the local cluster has a kubelet node (make cluster-up or make run); the API and chart tests run on the bare API server: make cluster-down (or make stop) first" >&2; exit 1; fi
	bash e2e/env/cluster.sh up

## node-up / node-down: only the node half of cluster-up / cluster-down
node-up:
	bash e2e/env/cluster.sh up
	bash e2e/env/node.sh up

node-down:
	bash e2e/env/node.sh down

## api-test: tests against the real API server (the bare local one, started when it is not running)
api-test: cluster-bare
	KUBECONFIG=$${KUBECONFIG:-$(KUBECONFIG_LOCAL)} bash e2e/scenarios/api-test.sh

## run: the local cluster (cluster-up), the bpfpoly image built offline, the chart installed with
##      the Helm SDK (operator and agent Pods on node `local`), Debian kernels in qemu microVMs as
##      agent-only nodes (BPFPOLY_KERNELS, default "6.1"; e.g. BPFPOLY_KERNELS="5.10 6.12"),
##      samples applied, what was chosen where and why
run:
	bash e2e/env/run.sh run

## stop: helm uninstall (unloads every program), microVMs off, node and control plane down; checks
##       that no container, Pod, program, pin, iptables chain, bridge or qemu is left
stop:
	bash e2e/env/run.sh stop

## chart-test: Helm chart lint, render, schema, install/upgrade/uninstall and RBAC on the real API server
chart-test: cluster-bare
	KUBECONFIG=$${KUBECONFIG:-$(KUBECONFIG_LOCAL)} bash e2e/scenarios/chart-test.sh

## bench: dispatch overhead, agent latencies, operator at scale, selection engine (writes BENCHMARKS figures)
bench:
	bash e2e/bench/bench.sh

## fuzz: time-bounded fuzzing of object inspection, validation, requirement parsing, BTF answers
fuzz:
	bash e2e/fuzz/fuzz.sh

## chaos: agent SIGKILLs, API server and etcd restarts, operator restart mid-rollout
chaos:
	bash e2e/chaos/chaos.sh

## soak: apply/update/delete cycles; nothing left behind, agent RSS stable
soak:
	bash e2e/chaos/soak.sh

## node-test: the chart on a real kubelet node (e2e/env/node.sh) from the image built offline:
## Pods Ready, programs loaded from the agent's container, restarts, upgrade, uninstall
node-test:
	bash e2e/scenarios/node-test.sh

## test: everything; what CI runs
## e2e: the end-to-end scenarios on the real stack
e2e:
	bash e2e/scenarios/e2e.sh

## kernels: the kernel matrix: every sample on Debian 5.10, 6.1, 6.12 and 7.2 (qemu microVMs)
##          and this host, exact per-kernel expectations; writes target/kernels/matrix.json
kernels:
	bash e2e/kernels/matrix.sh

test: deps lint unit api-test chart-test e2e kernels node-test

clean:
	rm -rf target ebpf/build
