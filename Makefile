# The two commands of the README, and a few for developers.
.PHONY: demo test lint bench clean

demo:
	@scripts/bootstrap.sh
	@.venv/bin/python -m espdp lab

test:
	@scripts/bootstrap.sh
	.venv/bin/python -m ruff check espdp tests bench
	.venv/bin/python -m pytest -q

lint:
	.venv/bin/python -m ruff check espdp tests bench

bench:
	@scripts/bootstrap.sh
	.venv/bin/python bench/engine.py --all

clean:
	rm -rf build .venv espdp/*.so src_cython/espdp/*.c src_cython/espdp/*.html
