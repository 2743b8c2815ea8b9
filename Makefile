# The two set-up commands of the README.
.PHONY: test demo

# Every test: fmt, clippy, cargo test, the end-to-end suite, a demo smoke run.
test:
	scripts/test

# Gateway + two replicas of the example server; prints how to call it.
demo:
	scripts/demo
