// A forward-protocol client for envoygeo's tests: the Go fluent-logger
// (github.com/fluent/fluent-logger-golang), an implementation independent of envoygeo's.
// It posts -events records (each {"log": "<prefix>-<i>", "n": i}) under -tag and exits 0
// once the logger closed cleanly (every chunk acknowledged with -ack), 1 otherwise.
package main

import (
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/fluent/fluent-logger-golang/fluent"
)

func main() {
	host := flag.String("host", "127.0.0.1", "forward server host")
	port := flag.Int("port", 24224, "forward server port")
	tag := flag.String("tag", "envoy.access", "tag")
	events := flag.Int("events", 100, "records to post")
	prefix := flag.String("prefix", "go", "log prefix")
	ack := flag.Bool("ack", true, "RequestAck: wait for the server's ack of each chunk")
	async := flag.Bool("async", false, "Async: buffer and send from a goroutine")
	retries := flag.Int("retries", 60, "MaxRetry (each 500 ms apart at most)")
	sharedKey := flag.String("shared-key", "", "not supported by this library; must be empty")
	flag.Parse()
	if *sharedKey != "" {
		fmt.Fprintln(os.Stderr, "fluent-logger-golang has no shared_key handshake")
		os.Exit(2)
	}
	logger, err := fluent.New(fluent.Config{
		FluentHost:         *host,
		FluentPort:         *port,
		RequestAck:         *ack,
		Async:              *async,
		MaxRetry:           *retries,
		RetryWait:          100,
		MaxRetryWait:       500,
		Timeout:            5 * time.Second,
		WriteTimeout:       5 * time.Second,
		SubSecondPrecision: true,
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "connect:", err)
		os.Exit(1)
	}
	failed := 0
	for i := 0; i < *events; i++ {
		rec := map[string]interface{}{"log": fmt.Sprintf("%s-%d", *prefix, i), "n": i}
		if err := logger.Post(*tag, rec); err != nil {
			fmt.Fprintln(os.Stderr, "post:", i, err)
			failed++
		}
	}
	if err := logger.Close(); err != nil {
		fmt.Fprintln(os.Stderr, "close:", err)
		os.Exit(1)
	}
	if failed > 0 {
		os.Exit(1)
	}
	fmt.Printf("posted %d\n", *events)
}
