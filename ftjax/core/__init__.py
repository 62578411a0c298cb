"""The training core: state, step, loop, hooks and run setup. It names no task."""
