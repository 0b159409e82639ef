//! Putting a helper into its own transient systemd scope, `vmd-<name>.scope` in machine.slice,
//! before it runs any guest code (DESIGN.md, "Launch protocol" step 4).

use std::time::Duration;

use futures_util_lite::next_matching;
use zbus::{Connection, OwnedVariant, Variant};
use zbus_systemd::systemd1::ManagerProxy;

/// Room for the VMM itself, its page tables and the kernel's per-process memory on top of the
/// guest's RAM, in the scope's MemoryMax.
pub const MEMORY_OVERHEAD_BYTES: u64 = 128 << 20;
/// Tasks beyond one thread per vCPU: the VMM thread and some slack.
pub const TASKS_OVERHEAD: u64 = 16;
/// How long systemd may take to create the scope.
const JOB_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a previous scope of the same name may take to be collected.
const UNIT_GONE_TIMEOUT: Duration = Duration::from_secs(5);

fn clone_properties(
    properties: &[(String, OwnedVariant)],
) -> Result<Vec<(String, OwnedVariant)>, ScopeError> {
    properties
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.try_clone().map_err(ScopeError::Bus)?)))
        .collect()
}

/// Errors from creating a scope.
#[derive(Debug, thiserror::Error)]
pub enum ScopeError {
    #[error("cannot reach systemd")]
    Bus(#[source] zbus::Error),
    #[error("systemd refused to create {unit}")]
    Start {
        unit: String,
        #[source]
        source: zbus::Error,
    },
    #[error("systemd's job for {unit} ended with {result:?}")]
    JobFailed { unit: String, result: String },
    #[error("systemd did not finish creating {unit} within {JOB_TIMEOUT:?}")]
    Timeout { unit: String },
    #[error("systemd refused to stop the stale {unit}")]
    Stop {
        unit: String,
        #[source]
        source: zbus::Error,
    },
    #[error("systemd did not finish stopping the stale {unit} within {JOB_TIMEOUT:?}")]
    StopTimeout { unit: String },
}

/// The scope's unit name for a VM (VM names need no escaping: DESIGN.md's name rule only
/// allows characters that are valid in unit names).
pub fn unit_name(vm_name: &str) -> String {
    format!("vmd-{vm_name}.scope")
}

/// What goes into the scope.
pub struct ScopeRequest<'a> {
    pub vm_name: &'a str,
    pub pid: u32,
    pub memory_bytes: u64,
    pub vcpus: u32,
}

/// Creates the scope and waits until systemd has moved `pid` into it.
pub async fn start_scope(
    bus: &Connection,
    request: &ScopeRequest<'_>,
) -> Result<String, ScopeError> {
    let unit = unit_name(request.vm_name);
    let systemd = ManagerProxy::new(bus).await.map_err(ScopeError::Bus)?;
    // Subscribe before starting, so the JobRemoved of our job cannot be missed.
    let mut removed = systemd
        .receive_job_removed()
        .await
        .map_err(ScopeError::Bus)?;
    let variant = |v: Variant<'_>| OwnedVariant::try_from(v).map_err(ScopeError::Bus);
    let properties = vec![
        (
            "PIDs".to_string(),
            variant(Variant::from(vec![request.pid]))?,
        ),
        (
            "Slice".to_string(),
            variant(Variant::from("machine.slice"))?,
        ),
        (
            "Description".to_string(),
            variant(Variant::from(format!(
                "vmd virtual machine {}",
                request.vm_name
            )))?,
        ),
        (
            "CollectMode".to_string(),
            variant(Variant::from("inactive-or-failed"))?,
        ),
        (
            "MemoryMax".to_string(),
            variant(Variant::from(request.memory_bytes + MEMORY_OVERHEAD_BYTES))?,
        ),
        (
            "TasksMax".to_string(),
            variant(Variant::from(u64::from(request.vcpus) + TASKS_OVERHEAD))?,
        ),
        // The helper opens no device after it starts: everything arrives as an fd.
        (
            "DevicePolicy".to_string(),
            variant(Variant::from("strict"))?,
        ),
    ];
    // The VM runs no helper now, so a scope of the same name is stale: a previous helper's on
    // its way out (systemd collects it asynchronously), or one that stayed (its helper died
    // before systemd moved it in, or a daemon died while starting it). It is stopped, once,
    // and given a moment to go.
    let deadline = tokio::time::Instant::now() + UNIT_GONE_TIMEOUT;
    let mut stopped_stale = false;
    let job = loop {
        let started = systemd
            .start_transient_unit(
                unit.clone(),
                "fail".to_string(),
                clone_properties(&properties)?,
                Vec::new(),
            )
            .await;
        match started {
            Err(zbus::Error::MethodError(name, _, _))
                if name.as_str() == "org.freedesktop.systemd1.UnitExists"
                    && tokio::time::Instant::now() < deadline =>
            {
                if !stopped_stale {
                    stopped_stale = true;
                    tracing::warn!("{unit} outlived its helper; stopping it");
                    stop_scope(bus, request.vm_name).await?;
                } else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            other => {
                break other.map_err(|source| ScopeError::Start {
                    unit: unit.clone(),
                    source,
                })?;
            }
        }
    };
    let wait = next_matching(&mut removed, |signal| {
        let args = signal.args().ok()?;
        (args.job.as_str() == job.as_str()).then(|| args.result.clone())
    });
    match tokio::time::timeout(JOB_TIMEOUT, wait).await {
        Ok(Some(result)) if result == "done" => Ok(unit),
        Ok(Some(result)) => Err(ScopeError::JobFailed { unit, result }),
        Ok(None) | Err(_) => Err(ScopeError::Timeout { unit }),
    }
}

/// Stops VM `vm_name`'s scope if there is one, and waits (bounded) until systemd has stopped
/// it; it is then collected (CollectMode=inactive-or-failed).
pub async fn stop_scope(bus: &Connection, vm_name: &str) -> Result<(), ScopeError> {
    let unit = unit_name(vm_name);
    let systemd = ManagerProxy::new(bus).await.map_err(ScopeError::Bus)?;
    let mut removed = systemd
        .receive_job_removed()
        .await
        .map_err(ScopeError::Bus)?;
    let job = match systemd.stop_unit(unit.clone(), "replace".to_string()).await {
        Ok(job) => job,
        Err(zbus::Error::MethodError(name, _, _))
            if name.as_str() == "org.freedesktop.systemd1.NoSuchUnit" =>
        {
            return Ok(());
        }
        Err(source) => return Err(ScopeError::Stop { unit, source }),
    };
    let wait = next_matching(&mut removed, |signal| {
        let args = signal.args().ok()?;
        (args.job.as_str() == job.as_str()).then_some(())
    });
    match tokio::time::timeout(JOB_TIMEOUT, wait).await {
        Ok(Some(())) => Ok(()),
        Ok(None) | Err(_) => Err(ScopeError::StopTimeout { unit }),
    }
}

/// Subscribes to systemd's job signals (once per connection; JobRemoved is only sent to
/// subscribers).
pub async fn subscribe(bus: &Connection) -> Result<(), ScopeError> {
    let systemd = ManagerProxy::new(bus).await.map_err(ScopeError::Bus)?;
    systemd.subscribe().await.map_err(ScopeError::Bus)
}

/// Stream helpers without pulling in a futures crate.
mod futures_util_lite {
    use std::future::poll_fn;
    use std::pin::Pin;

    use zbus::export::futures_core::Stream;

    /// The first item for which `pick` returns `Some`, or `None` when the stream ends.
    pub async fn next_matching<S, T, R>(stream: &mut S, pick: impl Fn(&T) -> Option<R>) -> Option<R>
    where
        S: Stream<Item = T> + Unpin,
    {
        loop {
            let item = poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)).await?;
            if let Some(result) = pick(&item) {
                return Some(result);
            }
        }
    }
}
