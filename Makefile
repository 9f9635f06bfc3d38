# One virtual environment for everything. torch is installed first, pinned to the CPU wheel,
# so that resolving the other dependencies never pulls CUDA packages onto a CPU machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
DEMO_OUT ?= runs/demo

.PHONY: setup setup-system lint format test test-slow test-slow-ci test-all demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# System packages: nginx, the reverse proxy `coordinator superlink` puts in front of the SuperLink
# (server/proxy.py). Idempotent; where apt is not available it says so and leaves it to the admin.
setup-system:
	@if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then \
		echo "nginx: installed"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq nginx; \
	else \
		echo "setup-system: apt-get not available: install nginx with this system's package manager" \
		     "(coordinator superlink needs it; the slow tests that start a SuperLink need it too)"; \
	fi

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: setup
	$(PY) -m pytest -q

# The tests marked slow (real SuperLink and SuperNode processes). pytest exits 5 when it collects
# no test: nothing to run is not a failure.
test-slow: setup
	$(PY) -m pytest -q -m slow || [ $$? -eq 5 ]

# The slow tests CI gates on: those verified green (twice) on the merged tree so far. From
# tests/test_faults.py the three faults issue 12 names, in file order: the killed-SuperLink test
# replaces the module's SuperLink and must run last. Still only in `make test-slow`: the
# stopped-run resume (10 min), the restarted SuperNode and the end-to-end deployment test (CI must
# stay under 60 minutes). The evidence job's quick run took 2 min 56 s on an idle 2-core machine.
SLOW_CI ?= tests/test_trust.py tests/test_site_tasks.py \
	tests/test_modalities.py::test_three_ehr_only_sites_run_end_to_end \
	tests/test_pretrain_job.py::test_pretrain_job_writes_report_plots_and_the_full_table \
	tests/test_deployment.py::test_join_to_an_unreachable_server_fails_fast_in_one_line \
	tests/test_deployment.py::test_join_with_the_wrong_certificate_is_refused \
	tests/test_deployment.py::test_a_node_with_an_unregistered_key_cannot_join \
	tests/test_deployment.py::test_a_restarted_superlink_registers_the_registry_again_and_admits_those_sites_only \
	tests/test_hardening.py::test_insecure_superlink_warns_loudly \
	tests/test_hardening.py::test_superlink_stops_with_its_parent_process \
	tests/test_evidence.py::test_quick_report_answers_every_question \
	tests/test_federation.py::test_resumed_run_equals_uninterrupted_run \
	tests/test_privacy_sweep.py::test_the_server_asks_for_dp_and_each_site_reports_its_spend \
	tests/test_privacy_sweep.py::test_sweep_writes_table_and_plot_on_one_setup \
	tests/test_transport.py::test_a_two_site_simulation_under_int8 \
	tests/test_faults.py::test_a_frozen_site_does_not_stop_the_run_and_join_leaves_nothing_behind \
	tests/test_faults.py::test_a_killed_supernode_does_not_stall_the_round_and_the_site_rejoins \
	tests/test_faults.py::test_a_killed_superlink_is_reported_unreachable_and_the_run_resumes_bit_identical

test-slow-ci: setup
	$(PY) -m pytest -q -m slow $(SLOW_CI)

test-all: setup
	$(PY) -m pytest -q -m ""

demo: setup
	$(PY) -m simulations.demo --out $(DEMO_OUT)

bench: setup
	$(PY) benchmarks/data_pipeline.py
	$(PY) benchmarks/ct_attention.py

clean:
	rm -rf $(VENV) runs outputs multirun
