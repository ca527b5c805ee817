"""The benchmarks: latency histograms and load runners, the 2PC overhead benchmark, the report."""
