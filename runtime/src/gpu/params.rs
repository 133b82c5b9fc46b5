//! Uniform parameter blocks.
//!
//! Every kernel reads its shapes and scalars from one uniform struct. The WGSL structs use only
//! 4-byte scalars (`u32`, `i32`, `f32`) and 16-byte vectors (`vec4<u32>`, `vec4<i32>`,
//! `vec4<f32>`); under WGSL's uniform layout rules a scalar packs at 4-byte alignment and a
//! `vec4` at 16, which is exactly what [`Params`] reproduces when fields are pushed in declaration
//! order.

/// Builder for the bytes of one uniform block, in WGSL declaration order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Params {
    words: Vec<u32>,
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

    /// The block's bytes, padded to a multiple of 16 as a uniform struct's size is.
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
