# Every target makes .venv when missing, so a fresh clone needs only Python 3.11+ and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?=

.PHONY: demo test protos lint bench profile bench-gpu bench-quality bench-discounts bench-purchases bench-report loadtest soak clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[train,dev,report]'
	touch $(STAMP)

# Shop → model → store → discountd → storefront calls → simulated shoppers → experiment report,
# in var/demo (DATA=online-retail for the real dataset). The steps are tools/demo.py.
demo: $(STAMP)
	$(BIN)/python -m tools.demo --data $(or $(DATA),synthetic)

# Two workers (pytest-xdist), each test file whole on one of them: a file's module fixtures (its
# databases, a fitted model) are made once, and its tests never run beside each other. In one
# process the suite keeps about one core busy. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy server trainer admin core
	npx --yes @bufbuild/buf@1.75.0 lint

# Serving throughput and latency (docs/BENCHMARKS.md "Serving performance"); the random-factor
# versions are built once into var/bench (the 1M-item one takes about 3 minutes).
bench: $(STAMP)
	$(BIN)/python -m bench.serving

# Where the serving time goes: each server thread's CPU and py-spy's samples of Python under
# load (docs/BENCHMARKS.md "Serving profile"); uses the 100k-item version make bench builds.
profile: $(STAMP)
	$(BIN)/python -m bench.profile

# Recommend's 1M-item graph on ONNX Runtime's CUDA provider against its CPU provider (issue #6):
# CPU rows only without a GPU. bench/gpu.sh's header: how a device run carries onnxruntime-gpu.
# ARGS go to bench.gpu, e.g. make bench-gpu ARGS="--items 100000 --batch 256"
bench-gpu: $(STAMP)
	PYTHON=$(BIN)/python bash bench/gpu.sh -- $(ARGS)

# Load a running discountd with bench/loadtest.json, by ghz when it is on PATH, else
# the built-in generator; e.g. make loadtest ARGS="--call check"
loadtest: $(STAMP)
	$(BIN)/python -m bench.load --config bench/loadtest.json $(ARGS)

# Bounded mixed load on one discountd for SOAK_SECONDS (default 600): throughput and RSS over
# time into docs/BENCHMARKS.md "Soak". Not part of make test.
soak: $(STAMP)
	$(BIN)/python -m bench.soak

# What discountd's hold of purchases since the model's data costs (server/purchases.py): read
# times and memory into docs/BENCHMARKS.md "Recent purchases"; DISCOUNT_BENCH_PG_URL adds PostgreSQL.
bench-purchases: $(STAMP)
	$(BIN)/python -m bench.purchases

# What `discountctl experiments report` costs on 1,000,000 events: wall time and peak RSS into
# docs/BENCHMARKS.md "Experiment report"; DISCOUNT_BENCH_PG_URL adds PostgreSQL.
bench-report: $(STAMP)
	$(BIN)/python -m bench.report

# Popularity, our model, implicit ALS and BPR on Online Retail and MovieLens 100K; rewrites the
# "Recommendation quality" section of docs/BENCHMARKS.md. Needs ../shared/datasets.
bench-quality: $(STAMP)
	$(BIN)/python -m bench.quality

# The "Discounts" figures of docs/BENCHMARKS.md: policies in the market simulator, uplift on Hillstrom.
bench-discounts: $(STAMP)
	$(BIN)/discount-train evaluate-policy --seeds 5 --plot docs/policy_margin.png
	$(BIN)/discount-train uplift --seed 0 --seed 1 --seed 2 --seed 3 --seed 4

# Stubs are committed; tests fail when they drift from the .proto.
protos: $(STAMP)
	$(BIN)/python -m tools.protos

clean:
	rm -rf $(VENV) var build *.egg-info
