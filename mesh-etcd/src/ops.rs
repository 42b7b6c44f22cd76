//! The pieces of a transaction, so that callers say what they mean rather than spell out
//! etcd's messages: a key that must be absent or unchanged, a put, a delete, a read.

use crate::pb::{
    compare, request_op, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp,
};

/// Holds when `key` does not exist (etcd counts a missing key's creation revision as 0).
pub fn absent(key: &[u8]) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Create as i32,
        key: key.to_vec(),
        target_union: Some(compare::TargetUnion::CreateRevision(0)),
    }
}

/// Holds when `key` was last changed at `mod_revision` (0: it does not exist).
pub fn unchanged_since(key: &[u8], mod_revision: i64) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Mod as i32,
        key: key.to_vec(),
        target_union: Some(compare::TargetUnion::ModRevision(mod_revision)),
    }
}

/// Puts `value` at `key`, attached to `lease` unless it is 0.
pub fn put(key: &[u8], value: Vec<u8>, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: key.to_vec(),
            value,
            lease,
            ..PutRequest::default()
        })),
    }
}

/// Deletes `key`, answering with what it held when `prev_kv`.
pub fn delete(key: &[u8], prev_kv: bool) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(
            DeleteRangeRequest {
                key: key.to_vec(),
                prev_kv,
                ..DeleteRangeRequest::default()
            },
        )),
    }
}

/// Reads `key`.
pub fn get(key: &[u8]) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestRange(RangeRequest {
            key: key.to_vec(),
            ..RangeRequest::default()
        })),
    }
}
