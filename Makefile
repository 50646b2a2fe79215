# The two commands of the README, and a few for developers.
.PHONY: demo test lint bench clean sanitize

demo:
	@scripts/bootstrap.sh
	@.venv/bin/python -m espdp lab

test:
	@scripts/bootstrap.sh
	.venv/bin/python -m ruff check espdp tests bench examples fuzz
	.venv/bin/python -m pytest -q
	scripts/sanitize.sh
	scripts/fuzz.sh 10

sanitize:
	@scripts/bootstrap.sh
	scripts/sanitize.sh

lint:
	.venv/bin/python -m ruff check espdp tests bench

bench:
	@scripts/bootstrap.sh
	@scripts/bench-deps.sh
	.venv/bin/python bench/engine.py --all
	.venv/bin/python bench/lookup.py
	.venv/bin/python bench/e2e.py
	.venv/bin/python bench/scale.py
	.venv/bin/python -m pytest -q bench/test_micro.py --benchmark-json bench/results/micro.json

clean:
	rm -rf build .venv espdp/*.so src_cython/espdp/*.c src_cython/espdp/*.html
