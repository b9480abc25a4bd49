//! The Load Reporting Service (LRS) on the xDS port: Envoys report what they saw of the
//! services they call; the reports go into the [`LoadBook`] (see [`crate::load`]).
//!
//! A stream is held to the xDS server's bounds: its first request within the first-request
//! timeout, requests no larger than the request limit, the same client-certificate check as
//! ADS, at most as many streams as ADS streams, and one report per half interval (a client
//! reporting faster has the extra reports dropped and counted).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::load_stats::v3::{
    LoadStatsRequest, LoadStatsResponse,
    load_reporting_service_server::{LoadReportingService, LoadReportingServiceServer},
};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info_span};

use crate::load::{LoadBook, LoadCounts, LoadKey, read_report};
use crate::metrics::label;

use super::{ClientAuth, XdsContext, check_identity, loggable, node, peer_info};

/// What the load reports feed: the book, the clock it is kept on, and the interval proxies
/// are asked to report at.
pub struct LoadState {
    book: Mutex<LoadBook>,
    started: Instant,
    /// The interval proxies report at.
    pub interval: Duration,
    streams: AtomicUsize,
}

impl LoadState {
    /// An empty book; proxies report every `interval`.
    pub fn new(interval: Duration) -> Self {
        LoadState {
            book: Mutex::new(LoadBook::new()),
            started: Instant::now(),
            interval,
            streams: AtomicUsize::new(0),
        }
    }

    /// Seconds since the book was started (its clock).
    pub fn now(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// Sums of the last `seconds`, for the keys `keep` accepts.
    pub fn window(
        &self,
        seconds: u64,
        keep: impl Fn(&LoadKey) -> bool,
    ) -> std::collections::BTreeMap<LoadKey, LoadCounts> {
        let now = self.now();
        self.lock().window(now, seconds, keep)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LoadBook> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The tonic service.
#[derive(Clone)]
pub struct LrsService {
    ctx: Arc<XdsContext>,
}

impl LrsService {
    /// A service over `ctx`.
    pub fn new(ctx: Arc<XdsContext>) -> Self {
        LrsService { ctx }
    }

    /// The gRPC server wrapper, reading requests up to the xDS request limit.
    pub fn into_server(self) -> LoadReportingServiceServer<Self> {
        let max_request = self.ctx.limits.max_request_bytes;
        LoadReportingServiceServer::new(self).max_decoding_message_size(max_request)
    }
}

#[tonic::async_trait]
impl LoadReportingService for LrsService {
    type StreamLoadStatsStream = ReceiverStream<Result<LoadStatsResponse, Status>>;

    async fn stream_load_stats(
        &self,
        request: Request<Streaming<LoadStatsRequest>>,
    ) -> Result<Response<Self::StreamLoadStatsStream>, Status> {
        let peer = peer_info(&request);
        let load = &self.ctx.load;
        if load.streams.fetch_add(1, Ordering::SeqCst) >= self.ctx.limits.max_streams {
            load.streams.fetch_sub(1, Ordering::SeqCst);
            count(&self.ctx, "refused");
            return Err(Status::resource_exhausted(
                "too many load report streams (--xds-max-streams)",
            ));
        }
        let (tx, rx) = mpsc::channel(1);
        let span = info_span!("lrs", peer = ?peer.addr, node = tracing::field::Empty);
        let ctx = self.ctx.clone();
        tokio::spawn(
            async move {
                drive(&ctx, request.into_inner(), &tx, peer.service.as_deref()).await;
                ctx.load.streams.fetch_sub(1, Ordering::SeqCst);
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn count(ctx: &XdsContext, result: &'static str) {
    ctx.metrics
        .load_reports
        .get_or_create(&label::Outcome { result })
        .inc();
}

/// One stream: the node, the answer asking for every cluster at the interval, then reports
/// until the proxy goes away.
async fn drive(
    ctx: &XdsContext,
    mut inbound: Streaming<LoadStatsRequest>,
    tx: &mpsc::Sender<Result<LoadStatsResponse, Status>>,
    proven: Option<&str>,
) {
    let first = match tokio::time::timeout(ctx.limits.first_request_timeout, inbound.next()).await {
        Ok(Some(Ok(r))) => r,
        Ok(Some(Err(status))) => {
            let _ = tx.send(Err(status)).await;
            return;
        }
        Ok(None) => return,
        Err(_) => {
            count(ctx, "refused");
            let _ = tx
                .send(Err(Status::deadline_exceeded(
                    "no load report within the first-request timeout",
                )))
                .await;
            return;
        }
    };
    let identity = match node::parse_node(first.node.as_ref()) {
        Ok(i) => i,
        Err(e) => {
            count(ctx, "refused");
            let _ = tx.send(Err(Status::invalid_argument(e.to_string()))).await;
            return;
        }
    };
    tracing::Span::current().record("node", loggable(&identity.node_id, 256).as_str());
    if ctx.client_auth != ClientAuth::None
        && let (_, Some(status)) = check_identity(ctx.client_auth, proven, &identity.group.service)
    {
        count(ctx, "refused");
        let _ = tx.send(Err(status)).await;
        return;
    }
    let answer = LoadStatsResponse {
        send_all_clusters: true,
        load_reporting_interval: Some(crate::translate::proto::proto_duration(ctx.load.interval)),
        ..Default::default()
    };
    if tx.send(Ok(answer)).await.is_err() {
        return;
    }
    let mut last: Option<Instant> = None;
    let mut request = Some(first);
    loop {
        if let Some(r) = request.take() {
            // A client reporting faster than asked gets its extra reports dropped.
            let too_soon = last.is_some_and(|t| t.elapsed() < ctx.load.interval / 2);
            if too_soon && !r.cluster_stats.is_empty() {
                count(ctx, "dropped");
            } else if !r.cluster_stats.is_empty() {
                last = Some(Instant::now());
                record(ctx, &r);
            }
        }
        match inbound.next().await {
            Some(Ok(r)) => request = Some(r),
            Some(Err(status)) => {
                debug!(%status, "load report stream ended");
                return;
            }
            None => return,
        }
    }
}

/// Adds a report to the book and the counters.
fn record(ctx: &XdsContext, request: &LoadStatsRequest) {
    let state = ctx.cache.state();
    let report = read_report(request, &state);
    debug!(
        clusters = request.cluster_stats.len(),
        figures = report.len(),
        "load report"
    );
    count(ctx, "accepted");
    for (key, counts) in &report {
        let labels = label::ServiceOrigin {
            service: key.service.clone(),
            origin: key.origin.to_string(),
            traffic: if key.mirror { "mirror" } else { "live" },
        };
        let m = &ctx.metrics;
        m.load_requests
            .get_or_create(&labels)
            .inc_by(counts.requests);
        m.load_errors.get_or_create(&labels).inc_by(counts.errors);
    }
    let now = ctx.load.now();
    ctx.load.lock().record(now, &report);
}

/// The error rates of a migration's old and new origins over its last interval, from the
/// live (not mirrored) load reports about `service`.
pub fn plan_check(
    load: &LoadState,
    service: &str,
    m: &crate::model::Migration,
) -> crate::model::PlanCheck {
    let sums = load.window(m.interval.as_secs().max(1), |k| {
        k.service == service && !k.mirror
    });
    let (mut old, mut new) = (LoadCounts::default(), LoadCounts::default());
    for (key, counts) in &sums {
        let side = if m.is_new(key.origin) {
            &mut new
        } else {
            &mut old
        };
        side.add(counts);
    }
    crate::model::PlanCheck {
        old: old.error_rate(),
        new: new.error_rate(),
    }
}
