//! Parameter blocks.
//!
//! Every kernel reads its shapes and scalars from one struct at `@binding(0)`. The WGSL structs use
//! only 4-byte scalars (`u32`, `i32`, `f32`) and 16-byte vectors (`vec4<u32>`, `vec4<i32>`,
//! `vec4<f32>`); a scalar packs at 4-byte alignment and a `vec4` at 16, which is exactly what
//! [`Params`] reproduces when fields are pushed in declaration order. WGSL lays a struct out the
//! same way in every address space (the uniform space only adds constraints these structs meet),
//! so the bytes are right whether a kernel declares the block `var<storage, read>` or
//! `var<uniform>`.
//!
//! # Why a storage buffer, not a uniform block
//!
//! lavapipe (Mesa 22.3, the software Vulkan driver of CI and of machines without a GPU) "inlines
//! uniforms": when a command buffer binds a pipeline whose loop bounds or branches read a uniform
//! block, it compiles the shader again with the bound values as constants, and keeps that
//! compilation until the pipeline is destroyed. It does so at every bind for as long as the result
//! is at most half the size of the original, and stops for good for that pipeline the first time
//! it is not. Pipelines live as long as the context, and small fixed shapes (a batch of 16 rows of
//! 10 classes) pay off every time, so each step of a stream grew the process by 0.5–2 MB per such
//! kernel (issue #11); shapes that vary (LAME's window filling up one frame at a time in frame
//! mode) switch it off early, which is why only some streams grew. Loads
//! from storage buffers are never inlined. The rule, checked for every entry point by
//! `every_entry_point_fits_downlevel_limits`:
//!
//! - a kernel declares its parameter block `var<storage, read>`, unless that would take it over
//!   the 4 storage buffers per stage of `wgpu::Limits::downlevel_defaults()` (phone GPUs);
//! - such a kernel declares it `var<uniform>` (uniform blocks do not count against that limit),
//!   and its entry points copy it into a workgroup variable of the same type first thing and read
//!   only that copy (a value that went through workgroup memory cannot be inlined either);
//!   `every_entry_point_fits_downlevel_limits` also checks that no entry point reads such a copy
//!   without loading it.
//!
//! The host binds one buffer usable both ways ([`PARAMS_USAGE`], offsets aligned for both, see
//! [`params_offset_alignment`]), so which of the two a kernel declares is the shader's business.

/// Usage of the buffer holding the parameter blocks of a program's dispatches: bound as a
/// read-only storage buffer by most kernels, as a uniform block by those at the storage limit.
pub const PARAMS_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE.union(wgpu::BufferUsages::UNIFORM);

/// Alignment of each dispatch's block inside the parameter buffer: a valid offset for a storage and
/// for a uniform binding, and at least 16 (a uniform struct's size is a multiple of 16).
pub fn params_offset_alignment(limits: &wgpu::Limits) -> u64 {
    (limits.min_uniform_buffer_offset_alignment.max(limits.min_storage_buffer_offset_alignment).max(16)) as u64
}

/// Builder for the bytes of one parameter block, in WGSL declaration order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Params {
    words: Vec<u32>,
    /// The word that holds the dispatch's first z workgroup (0 as built): a dispatch whose
    /// workgroups along z are independent (one image, group or phase each) may be split along z
    /// into pieces, each with its first z written here (see `plan::Program::z_piece`).
    z_base: Option<usize>,
    /// The dispatch's arithmetic (2 per multiply-add), where the lowering knows it: a better
    /// measure of its time than its workgroup count (see `Compiled::dispatch_work`).
    work: Option<u64>,
    /// BN-α's statistics coefficients [α, 1 − α, α·m/(m − 1), 1 − α] from this word on, for `m`
    /// values per channel: a program may set α again between runs
    /// (`Compiled::set_bn_alpha`).
    alpha: Option<(usize, u32)>,
    /// Frame statistics' weights [a_mean, 0, a_var, 0] from this word on: a program may set them
    /// again between runs (`Compiled::set_frame_alpha`).
    frame: Option<usize>,
}

impl Params {
    pub fn new() -> Params {
        Params::default()
    }

    pub fn u32(mut self, v: u32) -> Params {
        self.words.push(v);
        self
    }

    pub fn i32(mut self, v: i32) -> Params {
        self.words.push(v as u32);
        self
    }

    pub fn f32(mut self, v: f32) -> Params {
        self.words.push(v.to_bits());
        self
    }

    fn align16(&mut self) {
        while !self.words.len().is_multiple_of(4) {
            self.words.push(0);
        }
    }

    /// A `vec4<u32>`; missing trailing lanes are zero.
    pub fn vec4u(mut self, v: &[u32]) -> Params {
        assert!(v.len() <= 4, "vec4 takes at most 4 lanes");
        self.align16();
        for i in 0..4 {
            self.words.push(v.get(i).copied().unwrap_or(0));
        }
        self
    }

    /// A `vec4<i32>`; missing trailing lanes are zero.
    pub fn vec4i(mut self, v: &[i32]) -> Params {
        assert!(v.len() <= 4, "vec4 takes at most 4 lanes");
        self.align16();
        for i in 0..4 {
            self.words.push(v.get(i).copied().unwrap_or(0) as u32);
        }
        self
    }

    /// A `vec4<f32>`; missing trailing lanes are zero.
    pub fn vec4f(mut self, v: &[f32]) -> Params {
        assert!(v.len() <= 4, "vec4 takes at most 4 lanes");
        self.align16();
        for i in 0..4 {
            self.words.push(v.get(i).copied().unwrap_or(0.0).to_bits());
        }
        self
    }

    /// Eight `u32` lanes as two `vec4<u32>` fields (shapes and strides up to rank 8).
    pub fn vec8u(self, v: &[u32]) -> Params {
        assert!(v.len() <= 8, "vec8 takes at most 8 lanes");
        let (a, b) = v.split_at(v.len().min(4));
        self.vec4u(a).vec4u(b)
    }

    /// Eight `i32` lanes as two `vec4<i32>` fields.
    pub fn vec8i(self, v: &[i32]) -> Params {
        assert!(v.len() <= 8, "vec8 takes at most 8 lanes");
        let (a, b) = v.split_at(v.len().min(4));
        self.vec4i(a).vec4i(b)
    }

    /// Marks the last word pushed (0) as the z base ([`Params::z_base`]).
    pub fn z_base_in_last_word(mut self) -> Params {
        debug_assert_eq!(self.words.last(), Some(&0), "the z base starts at 0");
        self.z_base = Some(self.words.len() - 1);
        self
    }

    /// Marks the 4 words from `first` as BN-α's coefficients for `m` values per channel
    /// ([`Params::alpha_slot`]).
    pub fn bn_alpha_at(mut self, first: usize, m: u32) -> Params {
        debug_assert!(first + 4 <= self.words.len(), "the coefficients are pushed first");
        self.alpha = Some((first, m));
        self
    }

    /// Marks the 4 words from `first` as the frame statistics' weights [a_mean, 0, a_var, 0]
    /// ([`Params::frame_slot`]).
    pub fn frame_alpha_at(mut self, first: usize) -> Params {
        debug_assert!(first + 4 <= self.words.len(), "the weights are pushed first");
        self.frame = Some(first);
        self
    }

    /// The first word of the frame statistics' weights, when the block has them.
    pub fn frame_slot(&self) -> Option<usize> {
        self.frame
    }

    /// (first word, values per channel) of BN-α's coefficients, when the block has them.
    pub fn alpha_slot(&self) -> Option<(usize, u32)> {
        self.alpha
    }

    /// Records the dispatch's arithmetic ([`Params::work`]): 2 × the product of `dims` (the
    /// multiply-adds), saturating.
    pub fn work_hint(mut self, dims: &[usize]) -> Params {
        self.work = Some(dims.iter().fold(2u64, |a, &d| a.saturating_mul(d as u64)));
        self
    }

    /// [`Params::work`] set to `ops`.
    fn with_work(mut self, ops: u64) -> Params {
        self.work = Some(ops);
        self
    }

    /// The dispatch's arithmetic, when the lowering gave it.
    pub fn work(&self) -> Option<u64> {
        self.work
    }

    /// Whether the dispatch may be split along z.
    pub fn splits_along_z(&self) -> bool {
        self.z_base.is_some()
    }

    /// The block of the piece of a split dispatch whose first z workgroup is `base`, with `zs` of
    /// the dispatch's `z` workgroups (its work scaled to them).
    pub fn z_piece(&self, base: u32, zs: u32, z: u32) -> Params {
        let mut p = self.clone();
        if let Some(i) = p.z_base {
            p.words[i] = base;
        }
        match self.work {
            Some(w) => p.with_work((w as u128 * zs as u128 / z.max(1) as u128) as u64),
            None => p,
        }
    }

    /// The block's bytes, padded to a multiple of 16 (a uniform struct's size is; a
    /// storage binding may be larger than its struct).
    pub fn bytes(&self) -> Vec<u8> {
        let mut w = self.words.clone();
        while !w.len().is_multiple_of(4) || w.is_empty() {
            w.push(0);
        }
        bytemuck::cast_slice(&w).to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vec4_aligns_to_16_bytes() {
        let p = Params::new().u32(1).vec4u(&[2, 3]).u32(4);
        let w: Vec<u32> = bytemuck::cast_slice(&p.bytes()).to_vec();
        assert_eq!(w, vec![1, 0, 0, 0, 2, 3, 0, 0, 4, 0, 0, 0]);
    }
}
