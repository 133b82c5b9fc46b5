//! Reading ONNX model files.
//!
//! [`load_model`] decodes the protobuf (bindings in [`proto`], generated from
//! `runtime/proto/onnx.proto` by `tools/gen_proto.sh`) and returns a [`RawModel`]: the main graph
//! with its tensors decoded into host [`Tensor`]s, attributes flattened into [`Attr`] values, and
//! the default-domain opset resolved. Nothing here knows about operators; the IR builder and the
//! op layer interpret what this module hands them.
//!
//! Every malformed input (truncated file, inconsistent tensor, external data escaping the
//! model's directory, ...) comes back as an [`OnnxError`], never as a panic.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::tensor::{DType, Tensor};

#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::nursery,
    missing_docs,
    rustdoc::all,
    unreachable_pub,
    non_camel_case_types
)]
pub mod proto;

mod load;

pub use load::{
    MAX_TENSOR_ELEMENTS, bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16, load_model, load_model_bytes,
    tensor_from_proto, tensor_to_proto,
};

/// A float32 tensor's `ValueInfoProto` with fixed dimensions (graph inputs and outputs of the
/// models the runtime and its tests build in code).
pub fn float_value_info(name: &str, dims: &[i64]) -> proto::ValueInfoProto {
    proto::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(proto::TypeProto {
            value: Some(proto::type_proto::Value::TensorType(proto::type_proto::Tensor {
                elem_type: Some(proto::tensor_proto::DataType::Float as i32),
                shape: Some(proto::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| proto::tensor_shape_proto::Dimension {
                            value: Some(proto::tensor_shape_proto::dimension::Value::DimValue(d)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A decoded, validated model: what the IR builder starts from.
#[derive(Clone, Debug, PartialEq)]
pub struct RawModel {
    pub ir_version: i64,
    /// Version of the default domain ("" or "ai.onnx") operator set.
    pub opset: i64,
    /// `producer_name`, followed by `producer_version` when the file has one.
    pub producer: String,
    pub graph: RawGraph,
}

/// The main graph of a model.
#[derive(Clone, Debug, PartialEq)]
pub struct RawGraph {
    pub name: String,
    /// In file order (ONNX requires topological order; not checked here).
    pub nodes: Vec<RawNode>,
    /// Dense initializers in file order, followed by sparse initializers made dense.
    pub initializers: Vec<(String, Tensor)>,
    /// Graph inputs that are not initializers: the values a caller must feed.
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
}

/// Name, element type and shape of a graph input or output.
#[derive(Clone, Debug, PartialEq)]
pub struct ValueInfo {
    pub name: String,
    /// `None` when the type is missing, is not a tensor, or has an element type [`DType`] cannot
    /// hold.
    pub dtype: Option<DType>,
    /// `None` when the file gives no shape (rank unknown).
    pub shape: Option<Vec<DimSpec>>,
}

/// One dimension of a declared shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DimSpec {
    Fixed(u64),
    /// A named symbolic dimension such as `batch_size`.
    Sym(String),
    /// Neither a value nor a name (or a negative value, which ONNX does not allow).
    Unknown,
}

/// One node of the graph.
#[derive(Clone, Debug, PartialEq)]
pub struct RawNode {
    /// The node's name, or `"<op_type>_<index>"` when the file leaves it empty.
    pub name: String,
    pub op_type: String,
    /// As written in the file: "" or "ai.onnx" both mean the default domain.
    pub domain: String,
    /// Input value names; "" marks an omitted optional input and is kept so positions hold.
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attrs: BTreeMap<String, Attr>,
}

/// An attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum Attr {
    Float(f32),
    Int(i64),
    String(String),
    Tensor(Tensor),
    Floats(Vec<f32>),
    Ints(Vec<i64>),
    Strings(Vec<String>),
    /// A kind no supported operator takes: "graph", "graphs", "tensors", "sparse_tensor",
    /// "sparse_tensors", "type_proto" or "type_protos". Kept so the op layer can name it when it
    /// rejects the node.
    Other(&'static str),
}

/// Why a model could not be read.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed or truncated ONNX protobuf: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("the model has no graph")]
    NoGraph,
    #[error("the model imports no opset for the default domain (\"\" or \"ai.onnx\")")]
    NoDefaultOpset,
    #[error("the model imports the default-domain opset twice, as versions {0} and {1}")]
    ConflictingOpsets(i64, i64),
    #[error("tensor '{name}': {reason}")]
    Tensor { name: String, reason: String },
    #[error("tensor '{name}': external data '{}': {reason}", path.display())]
    ExternalData { name: String, path: PathBuf, reason: String },
    #[error("node '{node}', attribute '{name}': {reason}")]
    Attribute { node: String, name: String, reason: String },
    #[error("node '{node}': {reason}")]
    Node { node: String, reason: String },
    #[error("graph input or output '{name}': {reason}")]
    ValueInfo { name: String, reason: String },
    #[error("invalid graph: {0}")]
    Graph(String),
}

#[cfg(test)]
mod tests;
