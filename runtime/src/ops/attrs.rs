//! Typed access to a node's attributes with ONNX defaults and clear errors.

use std::collections::BTreeMap;

use super::{OpReason, OpResult};
use crate::onnx::Attr;
use crate::tensor::Tensor;

pub struct Attrs<'a> {
    map: &'a BTreeMap<String, Attr>,
}

fn kind(a: &Attr) -> &'static str {
    match a {
        Attr::Float(_) => "float",
        Attr::Int(_) => "int",
        Attr::String(_) => "string",
        Attr::Tensor(_) => "tensor",
        Attr::Floats(_) => "floats",
        Attr::Ints(_) => "ints",
        Attr::Strings(_) => "strings",
        Attr::Other(k) => k,
    }
}

impl<'a> Attrs<'a> {
    pub fn new(map: &'a BTreeMap<String, Attr>) -> Attrs<'a> {
        Attrs { map }
    }

    pub fn has(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    fn wrong(&self, name: &str, expected: &'static str) -> OpReason {
        let found = self.map.get(name).map(kind).unwrap_or("nothing");
        OpReason::AttributeType { name: name.to_owned(), expected, found }
    }

    pub fn int(&self, name: &str, default: i64) -> OpResult<i64> {
        match self.map.get(name) {
            None => Ok(default),
            Some(Attr::Int(v)) => Ok(*v),
            Some(_) => Err(self.wrong(name, "an int")),
        }
    }

    pub fn opt_int(&self, name: &str) -> OpResult<Option<i64>> {
        match self.map.get(name) {
            None => Ok(None),
            Some(Attr::Int(v)) => Ok(Some(*v)),
            Some(_) => Err(self.wrong(name, "an int")),
        }
    }

    pub fn float(&self, name: &str, default: f32) -> OpResult<f32> {
        match self.map.get(name) {
            None => Ok(default),
            Some(Attr::Float(v)) => Ok(*v),
            Some(_) => Err(self.wrong(name, "a float")),
        }
    }

    pub fn opt_float(&self, name: &str) -> OpResult<Option<f32>> {
        match self.map.get(name) {
            None => Ok(None),
            Some(Attr::Float(v)) => Ok(Some(*v)),
            Some(_) => Err(self.wrong(name, "a float")),
        }
    }

    pub fn string(&self, name: &str, default: &str) -> OpResult<String> {
        match self.map.get(name) {
            None => Ok(default.to_string()),
            Some(Attr::String(v)) => Ok(v.clone()),
            Some(_) => Err(self.wrong(name, "a string")),
        }
    }

    pub fn ints(&self, name: &str) -> OpResult<Option<Vec<i64>>> {
        match self.map.get(name) {
            None => Ok(None),
            Some(Attr::Ints(v)) => Ok(Some(v.clone())),
            Some(_) => Err(self.wrong(name, "a list of ints")),
        }
    }

    pub fn floats(&self, name: &str) -> OpResult<Option<Vec<f32>>> {
        match self.map.get(name) {
            None => Ok(None),
            Some(Attr::Floats(v)) => Ok(Some(v.clone())),
            Some(_) => Err(self.wrong(name, "a list of floats")),
        }
    }

    pub fn tensor(&self, name: &str) -> OpResult<Option<Tensor>> {
        match self.map.get(name) {
            None => Ok(None),
            Some(Attr::Tensor(t)) => Ok(Some(t.clone())),
            Some(_) => Err(self.wrong(name, "a tensor")),
        }
    }

    /// Names of attributes present, for rejecting ones we do not implement.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(|s| s.as_str())
    }

    /// Fails when an attribute outside `known` is present, so a model never silently runs with
    /// semantics we ignored.
    pub fn only(&self, known: &[&str]) -> OpResult<()> {
        for n in self.names() {
            if !known.contains(&n) {
                return Err(OpReason::UnknownAttribute(n.to_owned()));
            }
        }
        Ok(())
    }
}
