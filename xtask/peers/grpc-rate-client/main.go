// grpc-rate-client: the load client of `cargo xtask bench compare`.
//
// One gRPC channel (grpc-go ClientConn) to --target, unary grpc.health.v1
// Check calls sent at a fixed rate from --start-unix-ms for --duration-ms,
// open loop: a slow answer does not delay the next call, as with independent
// callers of a real service. Each answer names its pod in the x-pod response
// header. Prints one JSON line: calls per pod and failures per time bucket,
// and every latency.
//
// grpc-go is used because it is what a gRPC user runs, and because it
// implements the "headless Service" fix: a dns:// target with round_robin.
// The same client dials every system, so client CPU is comparable.
//
// With --stream-messages, the client also makes server-streaming
// /grpclb.test.Stream/Download calls one after another on the same channel
// (tests/src/grpc_stream.rs: a 12-byte request, message i is all bytes
// i % 251), checks every message, and reports whole streams per pod.
package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math/rand"
	"os"
	"sync"
	"time"

	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
)

const podHeader = "x-pod"
const errorsKept = 10

// Report is what the client prints; xtask/src/bench/compare reads it.
type Report struct {
	// Per bucket (by send time, from --start-unix-ms): answered calls per pod.
	Buckets []map[string]uint64 `json:"buckets"`
	// Per bucket: failed calls.
	FailuresPerBucket []uint64 `json:"failures_per_bucket"`
	// Latency of every answered call, in microseconds.
	LatenciesUs []uint32 `json:"latencies_us"`
	Ok          uint64   `json:"ok"`
	Failures    uint64   `json:"failures"`
	Errors      []string `json:"errors"`
	// Calls that should have been sent but were not (started late).
	Missed uint64 `json:"missed"`
	// Download calls that delivered every message whole, per pod; the
	// failed ones count in Failures.
	StreamsPerPod map[string]uint64 `json:"streams_per_pod"`
}

// rawCodec passes messages through as they are: the Download messages are
// raw bytes, not protobuf.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *v.(*[]byte), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	*v.(*[]byte) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string { return "raw" }

// download makes one Download call and checks every message; it returns the
// answering pod.
func download(conn *grpc.ClientConn, messages, messageBytes, intervalMs uint32) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	desc := &grpc.StreamDesc{StreamName: "Download", ServerStreams: true}
	stream, err := conn.NewStream(ctx, desc, "/grpclb.test.Stream/Download", grpc.ForceCodec(rawCodec{}))
	if err != nil {
		return "", err
	}
	request := make([]byte, 12)
	binary.BigEndian.PutUint32(request[0:], messages)
	binary.BigEndian.PutUint32(request[4:], messageBytes)
	binary.BigEndian.PutUint32(request[8:], intervalMs)
	if err := stream.SendMsg(&request); err != nil {
		return "", err
	}
	if err := stream.CloseSend(); err != nil {
		return "", err
	}
	header, err := stream.Header()
	if err != nil {
		return "", err
	}
	pod := ""
	if values := header.Get(podHeader); len(values) > 0 {
		pod = values[0]
	}
	received := uint32(0)
	for {
		var message []byte
		err := stream.RecvMsg(&message)
		if err == io.EOF {
			break
		}
		if err != nil {
			return "", err
		}
		if !bytes.Equal(message, bytes.Repeat([]byte{byte(received % 251)}, int(messageBytes))) {
			return "", fmt.Errorf("message %d from %s is not whole", received, pod)
		}
		received++
	}
	if received != messages {
		return "", fmt.Errorf("%d of %d messages from %s", received, messages, pod)
	}
	if pod == "" {
		return "", fmt.Errorf("answer without %s", podHeader)
	}
	return pod, nil
}

type answer struct {
	bucket  int
	pod     string
	latency time.Duration
	err     error
	// A Download call (untimed, no bucket) rather than a Check.
	streamed bool
}

func main() {
	target := flag.String("target", "", "gRPC target: host:port or dns://server:53/name:port")
	roundRobin := flag.Bool("round-robin", false, "round_robin over every resolved address (default pick_first)")
	rate := flag.Float64("rate", 50, "calls per second")
	startUnixMs := flag.Int64("start-unix-ms", 0, "when the first call goes out (Unix ms)")
	durationMs := flag.Int64("duration-ms", 10000, "how long calls go out")
	untilFile := flag.String("until-file", "", "instead of --duration-ms: calls go out until this file exists")
	bucketMs := flag.Int64("bucket-ms", 500, "bucket width")
	deadlineMs := flag.Int64("deadline-ms", 2000, "per-call deadline")
	connectTimeoutMs := flag.Int64("connect-timeout-ms", 5000, "how long to wait for the first connection")
	streamMessages := flag.Uint("stream-messages", 0, "also make Download calls one after another, of this many messages each (needs --until-file)")
	streamMessageBytes := flag.Uint("stream-message-bytes", 1024, "bytes per Download message")
	streamIntervalMs := flag.Uint("stream-interval-ms", 0, "the server's pause between Download messages")
	version := flag.Bool("version", false, "print the grpc-go version and exit")
	flag.Parse()
	if *version {
		fmt.Println(grpc.Version)
		return
	}
	if *target == "" || *rate <= 0 || *bucketMs <= 0 || *durationMs <= 0 {
		fail("--target, a positive --rate, --duration-ms and --bucket-ms are needed")
	}
	if *streamMessages > 0 && *untilFile == "" {
		fail("--stream-messages needs --until-file")
	}

	options := []grpc.DialOption{grpc.WithInsecure(), grpc.WithBlock()}
	if *roundRobin {
		// The default service config, not one from DNS TXT records.
		options = append(options, grpc.WithDisableServiceConfig(),
			grpc.WithDefaultServiceConfig(`{"loadBalancingConfig":[{"round_robin":{}}]}`))
	}
	dialCtx, cancelDial := context.WithTimeout(context.Background(), time.Duration(*connectTimeoutMs)*time.Millisecond)
	conn, err := grpc.DialContext(dialCtx, *target, options...)
	cancelDial()
	if err != nil {
		fail(fmt.Sprintf("connecting to %s: %v", *target, err))
	}
	defer conn.Close()
	client := healthpb.NewHealthClient(conn)

	start := time.Unix(0, *startUnixMs*int64(time.Millisecond))
	duration := time.Duration(*durationMs) * time.Millisecond
	bucketWidth := time.Duration(*bucketMs) * time.Millisecond
	interval := time.Duration(float64(time.Second) / *rate)
	// Clients started together must not all call at the same instant.
	phase := time.Duration(rand.Int63n(int64(interval)))
	calls := int(float64(duration-phase) / float64(interval))
	stopped := func(int) bool { return false }
	if *untilFile != "" {
		calls = int(^uint(0) >> 1)
		stopped = func(i int) bool {
			// Looked at every 20 calls: a stat per call would be wasted.
			if i%20 != 0 {
				return false
			}
			_, err := os.Stat(*untilFile)
			return err == nil
		}
	}

	answers := make(chan answer, 1024)
	var inFlight sync.WaitGroup
	// Empty, not nil: JSON [] rather than null.
	report := Report{
		Buckets:           []map[string]uint64{},
		FailuresPerBucket: []uint64{},
		LatenciesUs:       []uint32{},
		Errors:            []string{},
		StreamsPerPod:     map[string]uint64{},
	}
	var streaming sync.WaitGroup
	if *streamMessages > 0 {
		streaming.Add(1)
		go func() {
			defer streaming.Done()
			for {
				if _, err := os.Stat(*untilFile); err == nil {
					return
				}
				pod, err := download(conn, uint32(*streamMessages), uint32(*streamMessageBytes), uint32(*streamIntervalMs))
				if err != nil {
					err = fmt.Errorf("download: %v", err)
				}
				answers <- answer{pod: pod, err: err, streamed: true}
			}
		}()
	}
	collected := make(chan struct{})
	go func() {
		for a := range answers {
			if a.err != nil {
				report.Failures++
				if len(report.Errors) < errorsKept {
					report.Errors = append(report.Errors, a.err.Error())
				}
			}
			if a.streamed {
				if a.err == nil {
					report.StreamsPerPod[a.pod]++
				}
				continue
			}
			for len(report.Buckets) <= a.bucket {
				report.Buckets = append(report.Buckets, map[string]uint64{})
				report.FailuresPerBucket = append(report.FailuresPerBucket, 0)
			}
			if a.err != nil {
				report.FailuresPerBucket[a.bucket]++
				continue
			}
			report.Ok++
			report.Buckets[a.bucket][a.pod]++
			report.LatenciesUs = append(report.LatenciesUs, uint32(a.latency/time.Microsecond))
		}
		close(collected)
	}()

	for i := 0; i < calls && !stopped(i); i++ {
		due := start.Add(phase + time.Duration(i)*interval)
		wait := time.Until(due)
		if wait > 0 {
			time.Sleep(wait)
		} else if wait < -interval {
			// Behind by more than one call (started late): skip rather
			// than burst, so the rate stays what was asked for.
			report.Missed++
			continue
		}
		bucket := int((phase + time.Duration(i)*interval) / bucketWidth)
		inFlight.Add(1)
		go func() {
			defer inFlight.Done()
			ctx, cancel := context.WithTimeout(context.Background(), time.Duration(*deadlineMs)*time.Millisecond)
			defer cancel()
			var header metadata.MD
			sent := time.Now()
			_, err := client.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.Header(&header))
			latency := time.Since(sent)
			pod := ""
			if values := header.Get(podHeader); len(values) > 0 {
				pod = values[0]
			} else if err == nil {
				err = fmt.Errorf("answer without %s", podHeader)
			}
			answers <- answer{bucket: bucket, pod: pod, latency: latency, err: err}
		}()
	}
	inFlight.Wait()
	streaming.Wait()
	close(answers)
	<-collected
	line, err := json.Marshal(report)
	if err != nil {
		fail(fmt.Sprintf("encoding the report: %v", err))
	}
	fmt.Println(string(line))
}

func fail(message string) {
	fmt.Fprintln(os.Stderr, "grpc-rate-client:", message)
	os.Exit(1)
}
