//! The async runtime the serving subcommands run on.

/// Runs `work` on a multi-threaded runtime, for the subcommands that serve.
pub fn block_on<T>(
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    use anyhow::Context as _;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(work)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_work_runs_to_its_result() {
        let done = super::block_on(async { Ok(7) }).map_err(|e| e.to_string());
        assert_eq!(done, Ok(7));
    }
}
