//! Client-side tests: real connections to the test cluster.
