//! Reading what a blkfront published (`xen/io/blkif.h`): ring references, event channels,
//! ring order, queues and ABI. Pure: a node lookup in, the transport half of
//! [`crate::blkif::DeviceParams`] or a readable refusal out. Everything here comes from the
//! guest and is checked.
//!
//! ```text
//!  one queue:    ring-ref | ring-page-order + ring-ref0..ring-ref{2^order-1}, event-channel
//!  many queues:  multi-queue-num-queues = N, queue-K/{ring-ref.., event-channel}, K < N
//!                (ring-page-order stays at the top, shared by all queues)
//!  protocol:     absent or "x86_64-abi" (native); anything else is refused
//!  feature-persistent = 1: persistent grants, if the backend offered them
//! ```

use xen_sys::evtchn_port_t;

use crate::blkif::{
    abi::{GrantRef, PROTOCOL_X86_64},
    features::Features,
    QueueParams,
};

/// What the frontend negotiated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontRings {
    pub ring_order: u32,
    pub queues: Vec<QueueParams>,
    pub protocol: Option<String>,
    /// Persistent grants: offered by the backend and asked for by the frontend.
    pub persistent: bool,
}

fn parse_u32(key: &str, v: &str) -> Result<u32, String> {
    let t = v.trim();
    t.parse::<u32>()
        .map_err(|_| format!("frontend node {key} = {v:?} is not a number"))
}

/// Reads the frontend's ring setup through `get` (a frontend-relative key → value), checked
/// against what the backend offered.
pub fn read_rings(
    get: &mut dyn FnMut(&str) -> Option<String>,
    offered: &Features,
) -> Result<FrontRings, String> {
    let offered = offered.clamped();
    let protocol = get("protocol").filter(|p| !p.is_empty());
    if let Some(p) = &protocol {
        if p != PROTOCOL_X86_64 {
            return Err(format!(
                "frontend protocol {p:?} is not supported: only the native x86_64 ABI ({PROTOCOL_X86_64})"
            ));
        }
    }
    let ring_order = match get("ring-page-order") {
        None => None,
        Some(v) => Some(parse_u32("ring-page-order", &v)?),
    };
    if let Some(o) = ring_order {
        if o > offered.max_ring_page_order {
            return Err(format!(
                "frontend ring-page-order {o} exceeds max-ring-page-order {}",
                offered.max_ring_page_order
            ));
        }
    }
    let nq = match get("multi-queue-num-queues") {
        None => 1,
        Some(v) => parse_u32("multi-queue-num-queues", &v)?,
    };
    if nq == 0 || nq > offered.max_queues {
        return Err(format!(
            "frontend asks for {nq} queues; between 1 and {} offered",
            offered.max_queues
        ));
    }
    let mut queues = Vec::with_capacity(nq as usize);
    for q in 0..nq {
        let dir = if nq == 1 {
            String::new()
        } else {
            format!("queue-{q}/")
        };
        let mut key = |k: &str| -> Result<String, String> {
            let full = format!("{dir}{k}");
            get(&full).ok_or_else(|| format!("frontend node {full} is missing"))
        };
        let ring_refs: Vec<GrantRef> = match ring_order {
            None => vec![parse_u32("ring-ref", &key("ring-ref")?)?],
            Some(o) => (0..1u32 << o)
                .map(|i| {
                    let k = format!("ring-ref{i}");
                    parse_u32(&k, &key(&k)?)
                })
                .collect::<Result<_, _>>()?,
        };
        let event_channel: evtchn_port_t = parse_u32("event-channel", &key("event-channel")?)?;
        queues.push(QueueParams {
            ring_refs,
            event_channel,
        });
    }
    let persistent =
        offered.persistent && get("feature-persistent").is_some_and(|v| v.trim() == "1");
    Ok(FrontRings {
        ring_order: ring_order.unwrap_or(0),
        queues,
        protocol,
        persistent,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn read(nodes: &[(&str, &str)]) -> Result<FrontRings, String> {
        let map: HashMap<String, String> = nodes
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        read_rings(&mut |k| map.get(k).cloned(), &Features::default())
    }

    #[test]
    fn single_ring_legacy_and_ordered() {
        let r = read(&[("ring-ref", "8"), ("event-channel", "3")]).unwrap();
        assert_eq!(r.ring_order, 0);
        assert_eq!(
            r.queues,
            vec![QueueParams {
                ring_refs: vec![8],
                event_channel: 3
            }]
        );
        assert_eq!(r.protocol, None);
        let r = read(&[
            ("ring-page-order", "1"),
            ("ring-ref0", "8"),
            ("ring-ref1", "9"),
            ("event-channel", "3"),
            ("protocol", "x86_64-abi"),
        ])
        .unwrap();
        assert_eq!(r.ring_order, 1);
        assert_eq!(r.queues[0].ring_refs, vec![8, 9]);
        assert_eq!(r.protocol.as_deref(), Some("x86_64-abi"));
    }

    #[test]
    fn multi_queue() {
        let r = read(&[
            ("multi-queue-num-queues", "2"),
            ("queue-0/ring-ref", "1"),
            ("queue-0/event-channel", "5"),
            ("queue-1/ring-ref", "2"),
            ("queue-1/event-channel", "6"),
        ])
        .unwrap();
        assert_eq!(r.queues.len(), 2);
        assert_eq!(r.queues[1].event_channel, 6);
    }

    #[test]
    fn refusals_are_readable() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("event-channel", "3")], "ring-ref is missing"),
            (&[("ring-ref", "8")], "event-channel is missing"),
            (&[("ring-ref", "x"), ("event-channel", "3")], "not a number"),
            (
                &[("ring-ref", "-1"), ("event-channel", "3")],
                "not a number",
            ),
            (
                &[
                    ("ring-ref", "1"),
                    ("event-channel", "3"),
                    ("protocol", "x86_32-abi"),
                ],
                "not supported",
            ),
            (
                &[
                    ("ring-page-order", "9"),
                    ("ring-ref0", "1"),
                    ("event-channel", "3"),
                ],
                "exceeds",
            ),
            (
                &[
                    ("ring-page-order", "1"),
                    ("ring-ref0", "1"),
                    ("event-channel", "3"),
                ],
                "ring-ref1 is missing",
            ),
            (
                &[
                    ("multi-queue-num-queues", "0"),
                    ("ring-ref", "1"),
                    ("event-channel", "3"),
                ],
                "queues",
            ),
            (&[("multi-queue-num-queues", "99")], "queues"),
            (
                &[
                    ("multi-queue-num-queues", "2"),
                    ("queue-0/ring-ref", "1"),
                    ("queue-0/event-channel", "1"),
                ],
                "queue-1/ring-ref is missing",
            ),
        ];
        for (nodes, want) in cases {
            let e = read(nodes).unwrap_err();
            assert!(e.contains(want), "{nodes:?}: {e}");
        }
    }
}
