# The two set-up commands of the README.
.PHONY: test demo bench

# Every test: fmt, clippy, cargo test, the end-to-end suite, a demo smoke run.
test:
	scripts/test

# Gateway + two replicas of the example server; prints how to call it.
demo:
	scripts/demo

# The benchmark harness: gateway beside direct, nginx, Pushpin, Nginx+Nchan.
# Writes bench/RESULTS.md, bench/results.json and bench/plot-*.png.
bench:
	bench/run
