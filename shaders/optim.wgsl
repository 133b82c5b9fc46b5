// optim kernels: in progress
@compute @workgroup_size(1) fn noop_optim() {}
