# difflora — developer commands. Everything installs into .venv/ (git-ignored).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done

.PHONY: setup postgres test lint format serve tiny-assets bench probes clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: anything resolved before it would pull a multi-GB CUDA build (docs/architecture.md, Environment)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[faces,insightface,ray,service,dev]'
	# Debian's chromium for the web-page browser test (Playwright's own browser download fails offline);
	# best effort: the test is skipped where it cannot be installed
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed"; }
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Debian's PostgreSQL for the storage and job tests on both backends: the suite starts a throw-away server on a
# loopback port (tests/utils/postgres.py, as the postgres user when root) and stops it at the end, failed tests or
# not; best effort: where it cannot be installed, the PostgreSQL cases are skipped with that reason
postgres:
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null || \
		{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) || \
		echo "postgresql not installed: its tests will be skipped"; }

test: setup lint postgres
	$(BIN)/python -m pytest -q tests

serve: setup
	$(BIN)/difflora serve --preset tiny --host 127.0.0.1 --port 8000

FACES ?= $(or $(DIFFLORA_FACES),../shared/data/faces)
TINY_DATA ?= data/tiny-lora
# the amplified-MLP row of the table: the best scale in bench/results/quality_val_mlp.json (val identities)
MLP_SCALE ?= 6

# Rebuild everything in assets/tiny/ from the shared photos: the base model, the LoRA dataset (not committed;
# its summary goes to bench/results/dataset.json), the hypernetwork and its evaluation. Each step resumes.
tiny-assets: setup
	$(BIN)/difflora tiny pretrain --faces $(FACES) --out assets/tiny/base --samples assets/tiny/samples.png
	$(BIN)/difflora data build --faces $(FACES) --base tiny --method lora --rank 4 --out $(TINY_DATA) \
		--ray-address local --summary bench/results/dataset.json
	$(BIN)/difflora hypernet train --dataset $(TINY_DATA) --out assets/tiny/hypernet --token-dim 512
	$(BIN)/difflora hypernet tune --dataset $(TINY_DATA) --checkpoint assets/tiny/hypernet \
		--cfg-scales 1,2,3,4,5,6 --steps 1,25 --limit 30
	$(BIN)/difflora hypernet eval --dataset $(TINY_DATA) --checkpoint assets/tiny/hypernet --split val --limit 30 \
		--seeds 4 --baselines mlp --mlp-epochs 40 --mlp-scales 2,4,6,8 --out bench/results/quality_val_mlp.json
	$(BIN)/difflora hypernet eval --dataset $(TINY_DATA) --checkpoint assets/tiny/hypernet --out bench/results/quality.json \
		--mlp-epochs 40 --mlp-scales $(MLP_SCALE)
	$(BIN)/difflora hypernet eval --dataset $(TINY_DATA) --checkpoint assets/tiny/hypernet --baselines autoencoder \
		--out bench/results/quality_autoencoder.json
	$(BIN)/python bench/samples.py
	$(BIN)/python bench/personalize.py
	$(BIN)/python bench/methods.py --lora-dataset $(TINY_DATA) --train 120 --val 8 --eval 24 \
		--hypernet-set autoencoder.kind=linear --hypernet-set autoencoder.latent_tokens=4 \
		--hypernet-set autoencoder.latent_dim=8 --hypernet-set train.dn_steps=1000

# SD 1.5-size benchmarks on random weights (no download): merge/restore vs diffusers, photos -> adapter vs fine-tune
bench: setup
	$(BIN)/python bench/apply.py
	$(BIN)/python bench/personalize.py --base sd15-random --time-steps 3 --train-batch 2 --reps 2
	$(BIN)/python bench/personalize.py --base sd15-random --time-steps 3 --train-batch 2 --reps 2 \
		--hypernet-set autoencoder.kind=linear --hypernet-set autoencoder.latent_tokens=8 \
		--hypernet-set autoencoder.latent_dim=4 --out bench/results/personalize_sd15_linear.json

# Research probes of the tiny world (docs/hypernet.md, Results on the tiny world): what limits function fidelity.
# They read the LoRA dataset built by tiny-assets and write bench/results/<probe>.json. Hours on a CPU.
probes: setup
	$(BIN)/python -m bench.probes.predictability --dataset $(TINY_DATA)
	$(BIN)/python -m bench.probes.fidelity_ceiling --dataset $(TINY_DATA) --average 3
	$(BIN)/python -m bench.probes.photo_conditioning --dataset $(TINY_DATA)
	$(BIN)/python -m bench.probes.gradient_conditioning --dataset $(TINY_DATA)
	$(BIN)/python -m bench.probes.span_ceiling --dataset $(TINY_DATA) --seed-ids 150

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
