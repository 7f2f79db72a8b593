# Every target sets itself up: a virtualenv in .venv with pinned installs.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
TORCH   := torch==2.14.1 torchvision==0.29.1
PINNED  := timm==1.0.31 networkx==3.6.1 scipy==1.17.1 numpy==2.4.6 tqdm==4.70.1 safetensors==0.8.0 \
           scikit-learn==1.9.1 matplotlib==3.11.2 pytest==9.2.0 hypothesis==6.170.15 pytest-xdist==3.8.0

.PHONY: install test demo groups bench bench-quick perf tune budget-curve budget-size seeds pleas-free coverage scaling n-models digest stale gpu-check clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q $(PINNED)
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 tests

groups: $(STAMP)
	.venv/bin/fxmerge groups resnet50 --verify

demo: $(STAMP)
	.venv/bin/fxmerge demo

# analysis, export and merge checks over every timm family and 8 torchvision models (about 1.5 h;
# torchvision's ViT-B/16 is merged although it is above the 30M-parameter merge limit)
coverage: $(STAMP)
	$(PY) -m benchmarks.coverage --merge --timeout 600 --merge-anyway vit_b_16

bench: $(STAMP)
	$(PY) -m benchmarks.suite

# the commands behind docs/performance*.md (about an hour and a half in all on 2 cores; --adam-max-cols N adds the
# closed form against Adam on the layers with at most N columns, which takes hours more)
perf: $(STAMP)
	$(PY) -m benchmarks.products
	$(PY) -m benchmarks.performance --arch resnet50 --calib 512 --adam-max-cols 0 --memory-size 224 --out docs/performance.md
	$(PY) -m benchmarks.performance --arch vit_tiny_patch16_224 --calib 512 --adam-max-cols 0 --memory-size 224 --out docs/performance-vit.md
	$(PY) -m benchmarks.performance --arch resnet18 --calib 512 --adam-max-cols 0 --memory-size 224 --out docs/performance-resnet18.md
	$(PY) -m benchmarks.n_scaling --arch resnet18 --size 224 --calib 256 --out docs/performance-n-models.md

# every tuned default, chosen on the validation split (test figures beside it; about 3 h)
tune: $(STAMP)
	$(PY) -m benchmarks.tune --option ridge --values 0,1e-4,1e-3,1e-2,1e-1 --budgets 1,1.2 --out docs/ridge.md
	$(PY) -m benchmarks.tune --option bn_stats --values sweep,reset,source --out docs/bn-stats.md
	$(PY) -m benchmarks.tune --option ls_inputs --values merged,ensemble --set bn_stats=source --out docs/ls-inputs.md
	$(PY) -m benchmarks.tune --option ls_targets --values output,normalized --set bn_stats=source --out docs/ls-targets.md
	$(PY) -m benchmarks.tune --option planner --values pairs,reach,residual,auto --out docs/planner.md
	$(PY) -m benchmarks.tune --option matching --values activation,weight --threads 1 --out docs/matching.md
	$(PY) -m benchmarks.tune --option frontier_dtype --values float32,bfloat16,float16 --families resnet18,mobilenetv3,vit --budgets 1,1.2 --threads 1 --out docs/frontier-dtype.md

# how much budget PLeaS needs to come within 3 points of the ensemble (the families furthest from it)
budget-curve: $(STAMP)
	$(PY) -m benchmarks.budget_curve --families mobilenetv3,mbnet,vit --out docs/budget-curve.md

# the budget counted at the calibration size (32x32) against the deployed size (224x224)
budget-size: $(STAMP)
	$(PY) -m benchmarks.budget_size --out docs/budget-size.md

# merging 2, 3 and 4 models: PLeaS against the N-model baselines on digit tasks and styles
n-models: $(STAMP)
	$(PY) -m benchmarks.n_models --families resnet18 --n 2,3,4 --threads 1 --out docs/n-models.md
	$(PY) -m benchmarks.n_models --families vit,mbnet --n 3 --threads 1 --out docs/n-models-vit-mbnet.md

# data-parallel merging under torchrun (gloo) against one process
scaling: $(STAMP)
	$(PY) -m benchmarks.scaling

# sha1 of every merged state dict of the demo's pairs, every method (compare before and after a
# restructuring: make digest DIGESTS=before.json at the old commit, make digest COMPARE=before.json at the new)
digest: $(STAMP)
	$(PY) -m benchmarks.digest $(if $(DIGESTS),--out $(DIGESTS)) $(if $(COMPARE),--compare $(COMPARE))

# the results pages whose figures predate the last change to fxmerge/ (exit 1 if any)
stale:
	python3 -m benchmarks.provenance

# on a machine with a CUDA GPU: the CUDA tests and the CUDA performance figures
gpu-check:
	bash benchmarks/gpu_check.sh

seeds: $(STAMP)
	$(PY) -m benchmarks.seeds

pleas-free: $(STAMP)
	$(PY) -m benchmarks.pleas_free

bench-quick: $(STAMP)
	$(PY) -m benchmarks.suite --quick

clean:
	rm -rf .venv build *.egg-info
