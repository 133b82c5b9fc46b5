//! Einsum of two operands as a batched MatMul: each label is a batch label (in both operands and
//! the output), the contracted label (in both, not in the output), or a free label of one
//! operand (in it and the output). A is transposed to [batch…, A's other free…, 1…, i, k] and B
//! to [batch…, 1…, B's other free…, k, j] (a missing i, j or k, and each unit dim, by
//! Unsqueeze): free labels beyond the last of each operand become dims that MatMul broadcasts
//! against the other operand's unit dims, so no reshape is needed. The product is squeezed and
//! transposed to the output's order: attention as MaxViT's export writes it
//! (`BGHID,BGHJD->BGHIJ`), MViTv2's relative positions (`byhwc,hkc->byhwk`), and `ij,jk->ik`,
//! `bij,bjk->bik`, `i,i->`. Anything else — more than one contracted label, a label repeated in
//! one operand (a diagonal), a label summed away in one operand alone, ellipses, one or three
//! operands — is refused by name. The MatMul (its backward sums over broadcast dims) and
//! Transpose nodes carry the backward.

use super::Node;
use super::layer_norm::part_node;
use crate::onnx::RawNode;
use crate::ops::layout::{IntsArg, LayoutOp};
use crate::ops::{Attrs, Op, OpReason, OpResult};

fn unsupported(eq: &str, why: &str) -> OpReason {
    OpReason::Unsupported(format!("Einsum '{eq}': {why}; only two-operand batched matrix products are supported"))
}

/// Labels of one term, refusing ellipses, repeats and non-letters.
fn labels(eq: &str, term: &str) -> OpResult<Vec<char>> {
    if term.contains('.') {
        return Err(unsupported(eq, "ellipsis ('...') is not supported"));
    }
    let mut out = Vec::new();
    for c in term.chars() {
        if !c.is_ascii_alphabetic() {
            return Err(OpReason::Attribute(format!("Einsum '{eq}': '{c}' is not a label")));
        }
        if out.contains(&c) {
            return Err(unsupported(eq, &format!("label '{c}' repeats within one operand (a diagonal)")));
        }
        out.push(c);
    }
    Ok(out)
}

pub(super) fn expand(n: &RawNode) -> OpResult<Vec<Node>> {
    let a = Attrs::new(&n.attrs);
    a.only(&["equation"])?;
    let raw = a.string("equation", "")?;
    let eq: String = raw.chars().filter(|c| !c.is_whitespace()).collect();
    if eq.is_empty() {
        return Err(OpReason::MissingAttribute { op: "Einsum", name: "equation" });
    }
    let (lhs, rhs) = match eq.split_once("->") {
        Some((l, r)) => (l, Some(r)),
        None => (eq.as_str(), None),
    };
    let terms: Vec<&str> = lhs.split(',').collect();
    let inputs: Vec<String> = n.inputs.iter().filter(|s| !s.is_empty()).cloned().collect();
    if terms.len() != 2 || inputs.len() != 2 {
        return Err(unsupported(&raw, &format!("{} terms, {} inputs", terms.len(), inputs.len())));
    }
    let (la, lb) = (labels(&raw, terms[0])?, labels(&raw, terms[1])?);
    let out = match rhs {
        Some(r) => labels(&raw, r)?,
        None => {
            // Implicit output: the labels that appear once, in alphabetical order.
            let mut once: Vec<char> =
                la.iter().chain(&lb).filter(|c| !(la.contains(c) && lb.contains(c))).copied().collect();
            once.sort_unstable();
            once
        }
    };
    if let Some(c) = out.iter().find(|c| !la.contains(c) && !lb.contains(c)) {
        return Err(OpReason::Attribute(format!("Einsum '{raw}': output label '{c}' is in no operand")));
    }
    let batch: Vec<char> = out.iter().filter(|c| la.contains(c) && lb.contains(c)).copied().collect();
    let contracted: Vec<char> = la.iter().filter(|c| lb.contains(c) && !out.contains(c)).copied().collect();
    let free_a: Vec<char> = la.iter().filter(|c| !lb.contains(c)).copied().collect();
    let free_b: Vec<char> = lb.iter().filter(|c| !la.contains(c)).copied().collect();
    if let Some(c) = free_a.iter().chain(&free_b).find(|c| !out.contains(c)) {
        return Err(unsupported(&raw, &format!("label '{c}' is summed away within one operand")));
    }
    if contracted.len() > 1 {
        return Err(unsupported(&raw, "more than one contracted label"));
    }
    // The last free label of each operand is the product's row (A) or column (B); the others
    // are broadcast dims, A's before B's.
    let (extra_a, extra_b) = (&free_a[..free_a.len().saturating_sub(1)], &free_b[..free_b.len().saturating_sub(1)]);
    let tmp = |what: &str| format!("{}/{what}", n.name);
    let node = |part: &'static str, op: Op, inputs: Vec<String>, out: String| part_node(n, part, op, inputs, out);
    let position = |l: &[char], c: char| l.iter().position(|&x| x == c).unwrap_or(0) as i64;
    let mut nodes = Vec::new();
    // One operand to [batch…, rows, cols]: `rows` and `cols` are its free and contracted labels
    // (A) or contracted and free (B), a missing one inserted as a unit dim.
    let mut arrange = |which: &'static str, input: &str, l: &[char], rows: Option<char>, cols: Option<char>| {
        let mut order: Vec<char> = batch.clone();
        let own = if which == "a" { extra_a } else { extra_b };
        order.extend(own);
        order.extend(rows.iter().chain(cols.iter()));
        let perm: Vec<i64> = order.iter().map(|&c| position(l, c)).collect();
        let mut name = input.to_string();
        if perm.iter().enumerate().any(|(i, &p)| p != i as i64) {
            let (part, out) = if which == "a" { ("a_transposed", tmp("a_t")) } else { ("b_transposed", tmp("b_t")) };
            nodes.push(node(part, Op::Layout(LayoutOp::Transpose { perm: Some(perm) }), vec![name], out.clone()));
            name = out;
        }
        // Unit dims: the other operand's broadcast dims (after A's own, before B's), then a
        // missing row or column.
        let (nb, na, nbx) = (batch.len() as i64, extra_a.len() as i64, extra_b.len() as i64);
        let mut unit: Vec<i64> =
            if which == "a" { (nb + na..nb + na + nbx).collect() } else { (nb..nb + na).collect() };
        let last = nb + na + nbx;
        if rows.is_none() {
            unit.push(last);
        }
        if cols.is_none() {
            unit.push(last + 1);
        }
        if !unit.is_empty() {
            let (part, out) = if which == "a" { ("a_unsqueezed", tmp("a_u")) } else { ("b_unsqueezed", tmp("b_u")) };
            let op = Op::Layout(LayoutOp::Unsqueeze { axes: IntsArg::Attr(unit) });
            nodes.push(node(part, op, vec![name], out.clone()));
            name = out;
        }
        name
    };
    let (i, j, k) = (free_a.last().copied(), free_b.last().copied(), contracted.first().copied());
    let a_name = arrange("a", &inputs[0], &la, i, k);
    let b_name = arrange("b", &inputs[1], &lb, k, j);
    let y = n.outputs.first().filter(|s| !s.is_empty()).cloned().ok_or(OpReason::MissingOutput(0))?;
    nodes.push(node("matmul", Op::MatMul, vec![a_name, b_name], tmp("product")));
    // [batch…, A's other free…, B's other free…, i|1, j|1] → the output's labels.
    let nb = (batch.len() + extra_a.len() + extra_b.len()) as i64;
    let mut squeeze = Vec::new();
    if i.is_none() {
        squeeze.push(nb);
    }
    if j.is_none() {
        squeeze.push(nb + 1);
    }
    let mut have: Vec<char> = batch.clone();
    have.extend(extra_a.iter().chain(extra_b));
    have.extend(i.iter().chain(j.iter()));
    let perm: Vec<i64> = out.iter().map(|&c| position(&have, c)).collect();
    let identity = perm.iter().enumerate().all(|(x, &p)| p == x as i64);
    let mut name = tmp("product");
    if !squeeze.is_empty() {
        let target = if identity { y.clone() } else { tmp("squeezed") };
        let op = Op::Layout(LayoutOp::Squeeze { axes: IntsArg::Attr(squeeze) });
        nodes.push(node("squeezed", op, vec![name], target.clone()));
        name = target;
    }
    if !identity {
        nodes.push(node("y", Op::Layout(LayoutOp::Transpose { perm: Some(perm) }), vec![name], y));
    } else if name != y {
        nodes.push(node("y", Op::Layout(LayoutOp::Identity), vec![name], y));
    }
    Ok(nodes)
}
