# Convenience aliases for the README's commands (run as root).
.PHONY: setup test demo bench box vagrant-check
setup:
	bash scripts/setup.sh
test:
	bash scripts/test.sh
demo:
	bash scripts/demo.sh
bench:
	bash scripts/setup.sh && .venv/bin/python bench/run_all.py
box:
	bash scripts/make-box.sh --add
vagrant-check:
	bash scripts/setup.sh && .venv/bin/python -m iqn_lab.vmpair
