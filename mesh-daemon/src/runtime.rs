//! The async runtime the serving subcommands run on.

/// Runs `work` on a multi-threaded runtime, for the subcommands that serve: with `workers`
/// threads, or tokio's default (one per CPU, or `TOKIO_WORKER_THREADS`).
pub fn block_on<T>(
    workers: Option<std::num::NonZeroUsize>,
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    use anyhow::Context as _;
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        builder.worker_threads(n.get());
    }
    builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(work)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_work_runs_to_its_result() {
        let done = super::block_on(None, async { Ok(7) }).map_err(|e| e.to_string());
        assert_eq!(done, Ok(7));
        let one = std::num::NonZeroUsize::new(1);
        let workers = super::block_on(one, async {
            Ok(tokio::runtime::Handle::current().metrics().num_workers())
        })
        .map_err(|e| e.to_string());
        assert_eq!(workers, Ok(1));
    }
}
