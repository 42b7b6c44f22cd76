//! A watch of a prefix: the changes to its keys, revision by revision, from a given one.

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    client::{prefix_end, Client},
    pb::{self, watch_request::RequestUnion, WatchCreateRequest, WatchRequest},
    Error,
};

/// One key's change: its new value, or `None` when it was deleted; and the revision that
/// made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
    pub revision: i64,
}

/// What one answer of the watch carried: the changes of one or more whole revisions, and the
/// revision they reach: the last change's. (While a watch catches up, etcd's answers carry
/// the store's latest revision in their header, past changes still to come: resuming from it
/// would skip them.) An answer with no change is a progress note: nothing in the prefix
/// changed up to `revision`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchBatch {
    pub changes: Vec<Change>,
    pub revision: i64,
}

/// An open watch. Dropped, it ends.
pub struct Watch {
    answers: tonic::Streaming<pb::WatchResponse>,
    /// Held so that the request side stays open: etcd ends a watch whose client closed it.
    _requests: mpsc::Sender<WatchRequest>,
    endpoints: String,
    start: i64,
}

impl Client {
    /// Watches the keys under `prefix` from revision `start` on (the changes made at
    /// `start` included), with a progress note now and then while nothing changes.
    pub async fn watch_prefix(&self, prefix: &[u8], start: i64) -> Result<Watch, Error> {
        let (requests, rx) = mpsc::channel(1);
        let create = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: prefix.to_vec(),
                range_end: prefix_end(prefix),
                start_revision: start,
                progress_notify: true,
                ..WatchCreateRequest::default()
            })),
        };
        // The channel was made just above with room for one.
        let _ = requests.try_send(create);
        let mut client = self.watch.clone();
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        // A member cut off from the rest of its cluster refuses the watch rather than keep it
        // open and silent while the others move on.
        request.metadata_mut().insert(
            "hasleader",
            tonic::metadata::MetadataValue::from_static("true"),
        );
        let answers = self.call("a watch", client.watch(request)).await?;
        let mut watch = Watch {
            answers,
            _requests: requests,
            endpoints: self.endpoints.clone(),
            start,
        };
        // The first answer says whether the watch was made.
        match tokio::time::timeout(self.timeout, watch.answer()).await {
            Ok(Ok(first)) if first.created && !first.canceled => Ok(watch),
            Ok(Ok(first)) => Err(watch.refused(&first)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::TimedOut {
                endpoints: self.endpoints.clone(),
                what: "a watch",
                seconds: self.timeout.as_secs().max(1),
            }),
        }
    }
}

impl Watch {
    /// The next batch of changes, or progress note. Waits as long as etcd says nothing:
    /// the caller bounds the wait (progress notes come about every ten minutes; the HTTP/2
    /// keep-alive notices a member that went away).
    pub async fn next(&mut self) -> Result<WatchBatch, Error> {
        let answer = self.answer().await?;
        if answer.canceled {
            return Err(self.refused(&answer));
        }
        let noted = answer.header.as_ref().map_or(0, |h| h.revision);
        let changes: Vec<Change> = answer
            .events
            .into_iter()
            .filter_map(|e| {
                let kv = e.kv?;
                let deleted = e.r#type == pb::event::EventType::Delete as i32;
                Some(Change {
                    key: kv.key,
                    value: (!deleted).then_some(kv.value),
                    revision: kv.mod_revision,
                })
            })
            .collect();
        let revision = match changes.iter().map(|c| c.revision).max() {
            Some(last) => last,
            None => noted,
        };
        Ok(WatchBatch { changes, revision })
    }

    async fn answer(&mut self) -> Result<pb::WatchResponse, Error> {
        match self.answers.message().await {
            Ok(Some(answer)) => Ok(answer),
            Ok(None) => Err(Error::Ended {
                endpoints: self.endpoints.clone(),
                what: "a watch",
                message: "the stream closed".into(),
            }),
            Err(status) => Err(Error::Failed {
                endpoints: self.endpoints.clone(),
                what: "a watch",
                code: status.code(),
                message: status.message().replace('\n', " "),
            }),
        }
    }

    fn refused(&self, answer: &pb::WatchResponse) -> Error {
        if answer.compact_revision > 0 {
            return Error::Compacted {
                wanted: self.start,
                compacted: answer.compact_revision,
            };
        }
        Error::Ended {
            endpoints: self.endpoints.clone(),
            what: "a watch",
            message: if answer.cancel_reason.is_empty() {
                "cancelled".into()
            } else {
                answer.cancel_reason.replace(['\n', '\r'], " ")
            },
        }
    }
}
