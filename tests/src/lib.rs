//! Real-kernel test harness: cgroup "nodes", netns "pods" on a bridge in a
//! fabric netns, and guards that clean up on failure too.
